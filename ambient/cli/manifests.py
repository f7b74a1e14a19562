"""Reading manifests for `ambientctl apply/delete -f`: files, directories or stdin, multi-document YAML.

Every document is checked for the fields the API needs before anything is sent, and an error names the
source, the document number and the field, so a bad manifest applies nothing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(Exception):
    """A manifest that cannot be used; the message names the source, the document and the field."""


@dataclass(frozen=True)
class Document:
    source: str
    index: int  # 1-based position in its file
    obj: Obj

    @property
    def where(self) -> str:
        kind = self.obj.get("kind", "?")
        name = (self.obj.get("metadata") or {}).get("name", "?")
        return f"{self.source}: document {self.index} ({kind} {name!r})"


def _sources(paths: tuple[str, ...]) -> list[tuple[str, str]]:
    texts = []
    for raw in paths:
        if raw == "-":
            texts.append(("<stdin>", sys.stdin.read()))
            continue
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES and p.is_file())
            if not files:
                raise ManifestError(f"{raw}: no .yaml, .yml or .json files in this directory")
        elif path.is_file():
            files = [path]
        else:
            raise ManifestError(f'the path "{raw}" does not exist')
        texts += [(str(f), f.read_text()) for f in files]
    return texts


def load(paths: tuple[str, ...]) -> list[Document]:
    docs: list[Document] = []
    for source, text in _sources(paths):
        try:
            raw_docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ManifestError(f"{source}: invalid YAML{where}: {problem}") from None
        for index, obj in enumerate(raw_docs, 1):
            if obj is None:
                continue
            for item in _expand_lists(obj):
                doc = Document(source, index, item)
                check(doc)
                docs.append(doc)
    return docs


def _expand_lists(obj: Any) -> list[Any]:
    if isinstance(obj, dict) and str(obj.get("kind") or "").endswith("List") and isinstance(obj.get("items"), list):
        return list(obj["items"])
    return [obj]


def check(doc: Document) -> None:
    obj = doc.obj
    prefix = f"{doc.source}: document {doc.index}"
    if not isinstance(obj, dict):
        raise ManifestError(f"{prefix}: expected a mapping with apiVersion, kind and metadata, got "
                            f"{type(obj).__name__}")
    for field in ("apiVersion", "kind"):
        if not isinstance(obj.get(field), str) or not obj[field]:
            raise ManifestError(f"{prefix}: missing {field}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise ManifestError(f"{prefix} ({obj['kind']}): missing metadata")
    if not meta.get("name") and not meta.get("generateName"):
        raise ManifestError(f"{prefix} ({obj['kind']}): missing metadata.name")
    for field in ("labels", "annotations"):
        values = meta.get(field)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ManifestError(f"{doc.where}: metadata.{field} must be a mapping")
        for key, value in values.items():
            if not isinstance(value, str):
                raise ManifestError(f"{doc.where}: metadata.{field}.{key}: value {value!r} must be a string "
                                    "(quote it in YAML)")
