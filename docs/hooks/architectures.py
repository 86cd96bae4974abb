"""MkDocs hook: the supported-architectures page, generated at build time from the registry.

The page ``reference/architectures.md`` is not a file in ``docs/``: :func:`on_files` renders it
from ``llmtool.export.registry.ARCHITECTURES`` (one row per ``config.model_type``: the standard
graph, the fused graph or why not, whether int8 / int4 weights apply, the entry's note and the
variants it sends down the generic path), so the
table cannot drift from what ``llmtool export`` accepts.
"""

from __future__ import annotations

from typing import Any

PAGE = "reference/architectures.md"


def _cell(text: str) -> str:
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def render() -> str:
    """The page's Markdown."""
    from llmtool.export.registry import ARCHITECTURES, GENERIC

    lines = [
        "# Supported architectures",
        "",
        "Generated when the site is built, from the export registry "
        "(`llmtool.export.registry.ARCHITECTURES`): these are the `config.model_type` values "
        "`llmtool export` builds by hand (an extractor into the neutral decoder description). "
        "Any other decoder-only causal LM of transformers takes the generic path below.",
        "",
        "| family (`model_type`) | standard | `--fused` | `--quantize` int8 / int4 | notes |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(ARCHITECTURES):
        entry = ARCHITECTURES[name]
        fused = "yes" if entry.build_fused is not None else f"no: {entry.no_fused}"
        quantize = "yes" if entry.quantizable else "no"
        note = entry.note
        if entry.variants:  # what the registry sends down the generic path instead
            note += f". Through the generic path: {entry.variants}"
        lines.append(f"| `{name}` | yes | {_cell(fused)} | {quantize} | {_cell(note)} |")
    fused = f"no: {GENERIC.no_fused}"
    lines += [
        f"| any other causal LM (generic path) | yes | {_cell(fused)} | yes | {_cell(GENERIC.note)} |",
        "",
        "The generic path (`llmtool.export.generic`): a type without an extractor for which "
        "transformers has a decoder-only `*ForCausalLM` is traced by "
        "`torch.onnx.export(dynamo=True)` to the standard graph's I/O contract, then validated "
        "exactly like the hand-built graphs; the manifest's `builder` is `torch.onnx.dynamo` "
        "(`hand-built` otherwise). Tested on GPT-Neo, CodeGen, BioGPT and XGLM. The variants "
        "a registered family's hand-built graph cannot express (*Through the generic path* "
        "in the notes) take it too, decided from the config before any weight loads: the "
        "export says so on stderr, the table's caption and `llmtool.json`'s `builder_reason` "
        "give the reason, and `--dtype fp16` for them is refused with exit 2. "
        "Refused with "
        "exit 2, naming the type and the reason: models that return no key/value cache (Mamba "
        "and other state-space or recurrent families), models the exporter cannot trace (e.g. "
        "OLMoE's grouped expert matmul), and `--dtype fp16`. `--fused` where the table says "
        "no (and on the generic path) writes the standard graph instead, with the reason on "
        "stderr. The graph is written at opset 18 at least (`graph_opset` in the manifest).",
        "",
    ]
    from llmtool.export.seq2seq import SEQ2SEQ_TYPES

    lines += [
        "",
        "Encoder-decoders (`llmtool.export.seq2seq.SEQ2SEQ_TYPES`; an encoder graph and one "
        "cached decoder graph, fp32, no `--fused` or `--quantize` yet; see "
        "[Encoder-decoder models](../seq2seq.md)):",
        "",
        "| family (`model_type`) | notes |",
        "|---|---|",
        *(f"| `{name}` | {_cell(note)} |" for name, note in sorted(SEQ2SEQ_TYPES.items())),
    ]
    lines += [
        "",
        "Variants a static graph cannot express are refused from the config alone (exit 2, with "
        "the reason): dynamic NTK rope, `longrope` whose frequencies switch inside the context "
        "(`max_position_embeddings` > `original_max_position_embeddings`), and `--fused` where "
        "the rotary dimension is not a multiple of 16.",
        "",
    ]
    return "\n".join(lines)


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    """Add the generated page to the site's files (mkdocs >= 1.6: ``File.generated``)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files
