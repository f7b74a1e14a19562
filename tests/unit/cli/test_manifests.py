"""Manifest loading for `ambientctl apply/delete -f`: sources, multi-document YAML and validation messages."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from ambient.cli.manifests import ManifestError, load

CONFIGMAP = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"


def names(paths: tuple[str, ...]) -> list[str]:
    return [d.obj["metadata"]["name"] for d in load(paths)]


def test_multi_document_file_skips_empty_documents(tmp_path: Path) -> None:
    path = tmp_path / "all.yaml"
    path.write_text("---\n" + CONFIGMAP.format(name="a") + "---\n---\n# only a comment\n---\n"
                    + CONFIGMAP.format(name="b"))
    docs = load((str(path),))
    assert [(d.obj["metadata"]["name"], d.index, d.source) for d in docs] == [
        ("a", 1, str(path)), ("b", 4, str(path))]
    assert docs[1].where == f"{path}: document 4 (ConfigMap 'b')"


def test_directory_is_read_sorted_and_recursively_for_manifest_suffixes_only(tmp_path: Path) -> None:
    (tmp_path / "b.yml").write_text(CONFIGMAP.format(name="b"))
    (tmp_path / "a.yaml").write_text(CONFIGMAP.format(name="a"))
    (tmp_path / "c.json").write_text('{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}')
    (tmp_path / "d.txt").write_text(CONFIGMAP.format(name="d"))
    (tmp_path / "README.md").write_text("# not a manifest")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.yaml").write_text(CONFIGMAP.format(name="e"))
    assert names((str(tmp_path),)) == ["a", "b", "c", "e"]


def test_several_paths_keep_their_order(tmp_path: Path) -> None:
    for name in ("x", "y"):
        (tmp_path / f"{name}.yaml").write_text(CONFIGMAP.format(name=name))
    assert names((str(tmp_path / "y.yaml"), str(tmp_path / "x.yaml"))) == ["y", "x"]


def test_list_kinds_are_expanded(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("apiVersion: v1\nkind: List\nitems:\n"
                    "- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n"
                    "- {apiVersion: v1, kind: Secret, metadata: {name: b}}\n"
                    "---\napiVersion: v1\nkind: ConfigMapList\nitems:\n"
                    "- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}\n")
    docs = load((str(path),))
    assert [(d.obj["kind"], d.obj["metadata"]["name"], d.index) for d in docs] == [
        ("ConfigMap", "a", 1), ("Secret", "b", 1), ("ConfigMap", "c", 2)]


def test_generate_name_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "gen.yaml"
    path.write_text("apiVersion: v1\nkind: Pod\nmetadata:\n  generateName: web-\n")
    assert load((str(path),))[0].obj["metadata"] == {"generateName": "web-"}


def test_invalid_yaml_names_the_source_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    # Line 7 of the file, in its second document.
    path.write_text(CONFIGMAP.format(name="a") + "---\napiVersion: v1\n  kind: ConfigMap\n")
    message = f"{path}: invalid YAML at line 7, column 7: mapping values are not allowed here"
    with pytest.raises(ManifestError, match=f"^{re.escape(message)}$"):
        load((str(path),))


@pytest.mark.parametrize(("text", "message"), [
    ("kind: ConfigMap\nmetadata: {name: a}\n", "document 2: missing apiVersion"),
    ("apiVersion: v1\nmetadata: {name: a}\n", "document 2: missing kind"),
    ("apiVersion: v1\nkind:\nmetadata: {name: a}\n", "document 2: missing kind"),
    ("apiVersion: 1\nkind: ConfigMap\nmetadata: {name: a}\n", "document 2: missing apiVersion"),
    ("apiVersion: v1\nkind: ConfigMap\n", "document 2 (ConfigMap): missing metadata"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {labels: {a: b}}\n", "document 2 (ConfigMap): missing metadata.name"),
    ("- just\n- a list\n", "document 2: expected a mapping with apiVersion, kind and metadata, got list"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, labels: {version: 2}}\n",
     "document 2 (ConfigMap 'a'): metadata.labels.version: value 2 must be a string (quote it in YAML)"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, annotations: {enabled: true}}\n",
     "document 2 (ConfigMap 'a'): metadata.annotations.enabled: value True must be a string"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, labels: [x]}\n",
     "document 2 (ConfigMap 'a'): metadata.labels must be a mapping"),
])
def test_invalid_documents_name_source_document_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(CONFIGMAP.format(name="ok") + "---\n" + text)
    with pytest.raises(ManifestError, match=f"^{re.escape(f'{path}: {message}')}"):
        load((str(path),))


def test_invalid_list_item_names_its_document(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, metadata: {name: a}}\n")
    with pytest.raises(ManifestError, match=f"^{re.escape(str(path))}: document 1: missing kind$"):
        load((str(path),))


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ManifestError, match=f'^the path "{re.escape(str(missing))}" does not exist$'):
        load((str(missing),))


def test_directory_without_manifests(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ManifestError, match=re.escape("no .yaml, .yml or .json files in this directory")):
        load((str(tmp_path),))


def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(CONFIGMAP.format(name="from-stdin")))
    docs = load(("-",))
    assert [(d.source, d.obj["metadata"]["name"]) for d in docs] == [("<stdin>", "from-stdin")]
