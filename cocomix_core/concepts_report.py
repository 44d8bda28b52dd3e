"""`python -m cocomix_core.concepts_report SAE CHECKPOINT --data D --out O`: the name the issue gives the command
line of cocomix_core/reporting/concepts_report.py, which does the work."""

from cocomix_core.reporting.concepts_report import main

if __name__ == "__main__":
    main()
