# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""navit-push against hostile folders: credentials, disguised pickles, native modules, glob-like file names, weights
that disagree with the config. Every refusal names the file; nothing touches the Hub (the API is mocked)."""

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from siglip2_navit.tools import push
from test_hub import PUBLISHED, _expect_refusal, _NoNetwork, model_dir  # noqa: F401 (model_dir is a fixture)


TOKEN = "hf_" + "Ab3dE" * 7  # a Hub token's shape (built here, so that no token-like literal sits in the repo)
OPENSSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def _write(folder: Path, name: str, data) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _png(**kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), (10, 20, 30)).save(buffer, **kwargs)
    return buffer.getvalue()


def _dry_run_files(folder, monkeypatch, capsys):
    monkeypatch.setattr(push, "HfApi", _NoNetwork)
    assert push.main([str(folder), "--repo-id", "someone/tiny-navit", "--dry-run"]) == 0, capsys.readouterr().err
    return [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]


# ----------------------------------------------------------------------------------------------------------------------
# 1. credentials
# ----------------------------------------------------------------------------------------------------------------------


def _token_in_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["token"] = TOKEN
    (folder / "config.json").write_text(json.dumps(config))


def _escaped_token_in_config(folder):
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace("{", '{"note": "\\u0068' + TOKEN[1:] + '", ', 1))


def _token_in_weights_metadata(folder):
    tensors = load_file(folder / "model.safetensors")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "uploader": TOKEN})


@pytest.mark.parametrize(
    "name, plant, reason",
    [
        (".env", lambda f: _write(f, ".env", f"HF_TOKEN={TOKEN}\n"), "a credential file name"),
        ("hf_token", lambda f: _write(f, "hf_token", TOKEN), "a credential file name"),
        ("id_rsa", lambda f: _write(f, "id_rsa", OPENSSH_KEY), "a credential file name"),
        ("id_ed25519.pub", lambda f: _write(f, "id_ed25519.pub", "ssh-ed25519 AAAA me@host\n"), "credential file"),
        (".huggingface/token", lambda f: _write(f, ".huggingface/token", TOKEN), "a credential file name"),
        (".huggingface/stored.md", lambda f: _write(f, ".huggingface/stored.md", "x\n"), "in a credential folder"),
        (".netrc", lambda f: _write(f, ".netrc", "machine huggingface.co password x\n"), "a credential file name"),
        ("config.json", _token_in_config, "holds a Hugging Face token"),
        ("config.json", _escaped_token_in_config, "holds a Hugging Face token"),
        ("docs/notes.md", lambda f: _write(f, "docs/notes.md", f"# setup\nexport HF_TOKEN={TOKEN}\n"), "Hugging Face"),
        ("docs/key.txt", lambda f: _write(f, "docs/key.txt", OPENSSH_KEY), "holds a private key"),
        ("model.safetensors", _token_in_weights_metadata, "holds a Hugging Face token"),
    ],
)
def test_refuses_credentials(model_dir, monkeypatch, capsys, name, plant, reason):
    plant(model_dir)
    _expect_refusal(model_dir, monkeypatch, capsys, "Credentials are never published", f"{name} (", reason)


def test_refuses_a_hard_link_to_a_file_outside_the_folder(model_dir, tmp_path, monkeypatch, capsys):
    """A hard link is no symlink: it resolves inside the folder, yet it is someone else's file (here a root-only
    secret when run as root: readable to the publisher, not theirs to share)."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$salt$hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    (model_dir / "docs").mkdir(exist_ok=True)
    os.link(secret, model_dir / "docs" / "notes.txt")
    _expect_refusal(model_dir, monkeypatch, capsys, "Files you could not publish", "docs/notes.txt (a hard link")


def test_hard_links_within_the_folder_are_published(model_dir, monkeypatch, capsys):
    os.link(model_dir / "README.md", model_dir / "README_copy.md")
    assert "README_copy.md" in _dry_run_files(model_dir, monkeypatch, capsys)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads every file")
def test_refuses_an_unreadable_file(model_dir, monkeypatch, capsys):
    _write(model_dir, "docs/private.md", "# mine\n")
    (model_dir / "docs" / "private.md").chmod(0)
    _expect_refusal(model_dir, monkeypatch, capsys, "Files you could not publish", "docs/private.md (not readable")


# ----------------------------------------------------------------------------------------------------------------------
# 2. an allow-list of formats, checked by content: every disguise of a pickle is refused
# ----------------------------------------------------------------------------------------------------------------------


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))


PAYLOAD = pickle.dumps(_RunsCode(), protocol=4)


def _tar_with_a_later_pickle() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member, data in (("readme.txt", b"hello\n" * 200), ("state.bin", PAYLOAD)):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip_in_gzip() -> bytes:
    import gzip

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data", PAYLOAD)
    return gzip.compress(buffer.getvalue())


def _safetensors_plus(appended: bytes) -> bytes:
    buffer = io.BytesIO()
    from safetensors.torch import save

    buffer.write(save({"t": torch.zeros(4)}))
    return buffer.getvalue() + appended


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("weights.npy", b"I0\n" + PAYLOAD, ".npy is not a published format"),  # np.load(allow_pickle=True) runs it
        ("state.dat", b"(" + PAYLOAD, ".dat is not a published format"),
        ("text_pickle", pickle.dumps(["x" * 300000, _RunsCode()], protocol=0), "without a suffix"),
        ("bundle.tar", _tar_with_a_later_pickle(), ".tar is not a published format"),
        ("bundle.zip.gz", _zip_in_gzip(), ".gz is not a published format"),
        ("settings.yaml", "a: !!python/object/apply:os.system ['true']\n", ".yaml is not a published format"),
        ("notes.txt", PAYLOAD, "not UTF-8 text"),
        ("README.md", "---\nlibrary_name: transformers\n---\n# Café\n".encode("latin-1"), "not UTF-8 text"),
        ("notes.md", "ok\x00" + "x" * 10, "control character"),
        ("extra.json", PAYLOAD, "not UTF-8"),
        ("extra.safetensors", _safetensors_plus(PAYLOAD), "the tensors cover 16 bytes of a data section of"),
        ("torch.safetensors", b"PK\x03\x04" + PAYLOAD, "not safetensors"),
        ("photo.png", _png(format="PNG") + PAYLOAD, "data appended after its end"),
        ("photo.jpg", _png(format="PNG"), "not a JPEG image"),
        ("photo.gif", b"GIF89a" + PAYLOAD + b";", "not a valid GIF image"),
    ],
)
def test_refuses_what_is_not_an_allowed_format(model_dir, monkeypatch, capsys, name, data, reason):
    _write(model_dir, name, data)
    _expect_refusal(model_dir, monkeypatch, capsys, "not of a published format", f"{name} (", reason)


def test_pickle_names_keep_their_own_message(model_dir, monkeypatch, capsys):
    torch.save({"x": torch.zeros(1)}, model_dir / "pytorch_model.bin")
    _expect_refusal(model_dir, monkeypatch, capsys, "Pickle files are not published", "pytorch_model.bin (named like")


def test_allowed_formats_are_published(model_dir, monkeypatch, capsys):
    extras = {
        "LICENSE": "Apache License\nVersion 2.0\n",
        ".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "docs/notes.txt": "héllo, wörld\n\tindented\r\n",
        "docs/extra.json": json.dumps({"a": [1, 2.5, None, "x"]}),
        "examples/photo.png": _png(format="PNG"),
        "examples/photo.webp": _png(format="WEBP"),
        "examples/photo.gif": _png(format="GIF"),
        "examples/photo.jpeg": _png(format="JPEG"),
    }
    for name, data in extras.items():
        _write(model_dir, name, data)
    listed = _dry_run_files(model_dir, monkeypatch, capsys)
    assert listed == sorted(PUBLISHED + list(extras))


# ----------------------------------------------------------------------------------------------------------------------
# 3. exactly the validated files are uploaded: names are never glob patterns
# ----------------------------------------------------------------------------------------------------------------------


def _sent(api, folder: Path):
    """`(uploaded, deleted)` paths of the mocked commit, whichever HfApi call made it."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.utils import filter_repo_objects

    if api.upload_folder.called:  # what huggingface_hub would pick from the folder with those patterns
        kwargs = api.upload_folder.call_args.kwargs
        on_disk = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        chosen = filter_repo_objects(on_disk, allow_patterns=kwargs.get("allow_patterns"),
                                     ignore_patterns=kwargs.get("ignore_patterns"))
        return sorted(chosen), None
    api.create_commit.assert_called_once()
    operations = api.create_commit.call_args.kwargs["operations"]
    for op in operations:
        if isinstance(op, CommitOperationAdd):
            assert Path(op.path_or_fileobj) == folder / op.path_in_repo
    added = sorted(op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd))
    deleted = sorted(op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete))
    return added, deleted


def _glob_named_folder(folder: Path):
    """`photo[1].png` (a glob pattern that does not match itself) and `*/notes.md` (one that matches an unvalidated,
    never-published notebook checkpoint)."""
    _write(folder, "examples/photo[1].png", _png(format="PNG"))
    _write(folder, "*/notes.md", "# notes\n")
    _write(folder, ".ipynb_checkpoints/notes.md", f"HF_TOKEN={TOKEN}\n")
    return sorted(PUBLISHED + ["examples/photo[1].png", "*/notes.md"])


def test_upload_sends_exactly_the_validated_files_whatever_their_names(model_dir, monkeypatch):
    expected = _glob_named_folder(model_dir)
    api = mock.MagicMock()
    monkeypatch.setattr(push, "HfApi", mock.MagicMock(return_value=api))
    assert push.main([str(model_dir), "--repo-id", "someone/tiny-navit", "--private"]) == 0
    api.create_repo.assert_called_once_with(repo_id="someone/tiny-navit", repo_type="model", private=True, exist_ok=True)
    added, deleted = _sent(api, model_dir)
    assert added == expected
    assert not deleted  # by default nothing on the Hub is deleted
    api.list_repo_files.assert_not_called()


def test_delete_stale_deletes_every_other_remote_file_in_the_same_commit(model_dir, monkeypatch, capsys):
    expected = _glob_named_folder(model_dir)
    api = mock.MagicMock()
    api.list_repo_files.return_value = [
        ".gitattributes", "README.md", "pytorch_model.bin", "model-00001-of-00002.safetensors", "*/notes.md", "a[1].md"
    ]
    monkeypatch.setattr(push, "HfApi", mock.MagicMock(return_value=api))
    assert push.main([str(model_dir), "--repo-id", "someone/tiny-navit", "--delete-stale"]) == 0
    added, deleted = _sent(api, model_dir)
    assert added == expected
    assert deleted == ["a[1].md", "model-00001-of-00002.safetensors", "pytorch_model.bin"]
    assert "deleted in the same commit" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# 4. native modules
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["_fast.cpython-311-x86_64-linux-gnu.so", "libnavit.so.1", "kernels/attn.pyd", "helper.dylib", "x.dll"]
)
def test_refuses_native_modules(model_dir, monkeypatch, capsys, name):
    _write(model_dir, name, b"\x7fELF\x02\x01\x01" + b"\x00" * 57)
    _expect_refusal(model_dir, monkeypatch, capsys, "Native modules are never published", f"{name} (a native module")


# ----------------------------------------------------------------------------------------------------------------------
# 13. weights that disagree with the config's model: an error naming them, before anything is loaded
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, message", [(1, "has no place for: vision_model.encoder.layers.1."),
                                             (3, "the model needs: vision_model.encoder.layers.2.")])
def test_refuses_weights_for_another_layer_count(model_dir, monkeypatch, capsys, layers, message):
    import transformers

    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (model_dir / "config.json").write_text(json.dumps(config))
    fail = classmethod(lambda *a, **k: pytest.fail("the model was loaded before its weights were checked"))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fail)
    _expect_refusal(model_dir, monkeypatch, capsys, "does not match the configuration", message)


# ----------------------------------------------------------------------------------------------------------------------
# 12. integer weights (stored I32, loaded as zeros or garbage) are refused by name
# ----------------------------------------------------------------------------------------------------------------------


def test_refuses_integer_weights(model_dir, monkeypatch, capsys):
    tensors = load_file(model_dir / "model.safetensors")
    name = "vision_model.post_layernorm.weight"
    tensors[name] = torch.ones_like(tensors[name], dtype=torch.int32)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    _expect_refusal(model_dir, monkeypatch, capsys, f"Tensor {name!r} in", "is I32", "floating-point")
