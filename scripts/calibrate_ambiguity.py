"""Calibrate an engine folder's prompt ambiguity margin (torch-free) and print it as JSON.

    python scripts/calibrate_ambiguity.py [ENGINE_DIR] [--write]

Uses the folder's own ``text_encoder.onnx`` and prompt cache and the rule of
:func:`promptseg.export.refusal.calibrate_ambiguity` (what ``promptseg-export`` records for
new engines). ``--write`` stores the result in the manifest's ``prompt_refusal`` entry
(atomically; the other files and their hashes are untouched). Default: the packaged engine.
"""

from __future__ import annotations

import json
import sys

import click

from promptseg.export.files import atomic_write_json
from promptseg.export.refusal import calibrate_ambiguity
from promptseg.prompts import PromptVocabulary
from promptseg.runtime.manifest import MANIFEST, EngineFolder
from promptseg.runtime.prompt_resolver import PromptResolver


@click.command()
@click.argument("engine", required=False, type=click.Path(file_okay=False))
@click.option("--write", is_flag=True, help="store the margin in the engine's manifest.json")
def main(engine: str | None, write: bool) -> None:
    """Print the ambiguity calibration of ENGINE (default: the packaged engine)."""
    folder = EngineFolder.open(engine)
    vocab = PromptVocabulary()
    if folder.manifest.get("vocabulary_sha256") not in (None, vocab.sha256()):
        raise click.ClickException(
            f"{folder.path}: exported with another prompt vocabulary than promptseg.prompts"
        )
    resolver = PromptResolver(folder, threads=1)
    result = calibrate_ambiguity(resolver.cache, vocab, resolver.embed, resolver.threshold)
    json.dump(result, sys.stdout, indent=2)
    print()
    if write:
        manifest = dict(folder.manifest)
        manifest["prompt_refusal"] = {**manifest["prompt_refusal"], **result}
        atomic_write_json(folder.path / MANIFEST, manifest)
        print(f"wrote {folder.path / MANIFEST}", file=sys.stderr)


if __name__ == "__main__":
    main()
