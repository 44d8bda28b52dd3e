"""`python -m cocomix_core.data --settings PRESET --out DIR`: prepare the corpus as the flow's `prepare` step does."""

import argparse
import json
import logging
import sys

from cocomix_core.data.corpus import data_digest
from cocomix_core.data.stage import data_tokenizer_for, prepare_folder
from cocomix_core.plumbing.errors import CocomixError
from cocomix_core.plumbing.storage import Storage, default_storage_root
from settings.cli import add_settings_arguments, settings_from_args


def main(argv: list[str] | None = None) -> None:
    """Command line: prepare the corpus named by the settings into --out, as the flow's `prepare` step does.

    The tokenizer is `tokenizer.name` (for "teacher", the pretrained teacher's own, converted once under
    compute.storage_root or its default), and the offline lm-eval tasks are built too: the same manifest as
    the flow's for the same settings.
    """
    parser = argparse.ArgumentParser(description="Tokenize the corpus into train.bin / val.bin with a manifest.")
    add_settings_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = settings_from_args(args)
        storage = Storage(settings.compute.storage_root or default_storage_root(None))
        manifest = prepare_folder(settings, args.out, data_tokenizer_for(settings, storage))
    except CocomixError as error:  # settings, corpus or tokenizer: one line naming it, no traceback
        sys.exit(f"error: {error}")
    print(json.dumps({"out": args.out, "splits": manifest["splits"], "data_digest": data_digest(manifest)}, indent=2))


if __name__ == "__main__":
    main()
