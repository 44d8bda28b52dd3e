"""`python -m cocomix_core.data --settings PRESET --out DIR`: prepare the corpus as the flow's `prepare` step does."""

from cocomix_core.data.corpus import main

if __name__ == "__main__":
    main()
