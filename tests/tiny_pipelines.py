"""Parts of tiny pipelines that several backbone tests build offline."""

import json
import tempfile
from pathlib import Path


def clip_tokenizer(path: Path, *, max_length: int = 20) -> None:
    """A character-level CLIP tokenizer (vocab.json and an empty merges.txt written here: nothing downloaded)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,()'- ":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                      model_max_length=max_length).save_pretrained(path)
