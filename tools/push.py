# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Validate a siglip2-navit model folder, then upload it to the Hugging Face Hub.

Validation (everything must pass before anything is sent). First, statically (nothing of the folder is imported or
run yet):
  * its only Python files are this project's remote code (`CODE_FILES` in checkpoint_utils.py), each
    byte-identical to the installed package's copy; every `auto_map` (config.json, the processor configs, any top-level
    JSON) and `custom_pipelines` reference names a class of those files, none another repository's code;
  * every other file is of a published format, checked by its content (`file_safety`: safetensors whose header
    and size agree, JSON, UTF-8 text such as Markdown, PNG/JPEG/WebP/GIF images); anything else (pickles however
    disguised, archives, native modules, unknown formats) is refused by name, and so are credentials (credential file
    names, Hub tokens and private keys in any file, JSON strings included), unreadable files and hard links to files
    outside the folder;
  * the folder holds safetensors weights;
  * config.json, both processor configs, the remote-code files named by auto_map (and those they import) and the
    model card are present;
  * every tensor in the safetensors headers is one the config implies, with its shape, and none is missing;
Then, loading the folder's (now verified) code:
  * `AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads every weight (no missing, unexpected or
    mismatched tensors) and `AutoImageProcessor.from_pretrained(DIR, trust_remote_code=True)` loads;
  * the processor and the model agree on patch_size, temporal_patch_size and hidden_stride, and
    preprocessor_config.json and processor_config.json hold the same settings;
  * one forward pass on a sample image (processor -> model) gives finite features of the expected shapes.

Then the repository is created if needed and exactly the validated files are uploaded in one commit
(`huggingface_hub.HfApi().create_repo` + `create_commit` with one operation per file: names are never glob patterns).
Files already on the Hub that are not among them are kept, unless `--delete-stale` (then that same commit deletes
them, so that the repository mirrors the folder: no leftover shards, index or pickle files from an earlier upload;
`.gitattributes` is always kept). Authenticate beforehand with `hf auth login` (or `huggingface-cli login`) or the
HF_TOKEN environment variable. `--dry-run` does everything but the upload and prints
the file list.

Example:
    navit-push ./siglip2-navit-ovis2.5-9b --repo-id your-name/siglip2-navit-ovis2.5-9b --dry-run
"""

import argparse
import ast
import fnmatch
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

from . import checkpoint_utils as utils
from . import file_safety
from huggingface_hub import HfApi


# Never uploaded (and not validated): caches and editor/OS litter.
SKIP_PATTERNS = ("__pycache__", "*.pyc", ".git", ".cache", ".DS_Store", ".ipynb_checkpoints", ".*.tmp-*")
SETTINGS = ("patch_size", "temporal_patch_size", "hidden_stride")


class ValidationError(RuntimeError):
    """The folder is not fit to be published."""


def folder_files(folder: Path) -> List[str]:
    """Relative POSIX paths of the files to publish, skipping caches and litter."""
    files = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in SKIP_PATTERNS):
            continue
        if path.is_file():
            relative = path.relative_to(folder).as_posix()
            try:  # a link out of the folder would upload whatever it points at (a token, a key, ...)
                utils.resolve_inside(folder, relative, f"{folder}")
            except utils.ConversionError:
                raise ValidationError(
                    f"{path} links to {path.resolve()}, outside {folder}: every published file must lie inside the "
                    "folder (copy it in instead of linking)."
                ) from None
            files.append(relative)
    return files


def _python_files(folder: Path) -> List[str]:
    """Every `.py` file under `folder`, including ones in skipped folders (relative POSIX paths)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))


def _check_code_files(folder: Path) -> None:
    """The folder's Python files are exactly this project's remote code, byte for byte (nothing is imported)."""
    allowed = utils.CODE_FILES
    foreign = [name for name in _python_files(folder) if name not in allowed]
    if foreign:
        raise ValidationError(
            f"{folder} holds Python files that are not this project's remote code: {', '.join(foreign)}. Remote code "
            f"runs on the machine of everyone who loads the model with trust_remote_code=True; only "
            f"{', '.join(allowed)} may be published. Remove the others (nothing was imported or run)."
        )
    modified = [
        name
        for name in allowed
        if (folder / name).is_file() and (folder / name).read_bytes() != (utils.PACKAGE_DIR / name).read_bytes()
    ]
    if modified:
        raise ValidationError(
            f"{', '.join(modified)} in {folder} differ from the installed package's copies ({utils.PACKAGE_DIR}); only the "
            f"project's own remote code is published. Re-run the converter, or copy the files from the repository."
        )


def _code_refs(data: Any, where: str) -> Iterator[Tuple[str, Any]]:
    """`(location, "module.Class")` for every remote-code reference in a JSON document: `auto_map` entries (a
    tokenizer's is a list) and `custom_pipelines.<task>.impl`, at any depth."""
    if isinstance(data, list):
        for item in data:
            yield from _code_refs(item, where)
        return
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        if key == "auto_map":
            if not isinstance(value, dict):
                raise ValidationError(f"{where}: `auto_map` must be an object, got {value!r}.")
            for auto_class, refs in value.items():
                for ref in refs if isinstance(refs, list) else [refs]:
                    if ref is not None:
                        yield f"{where} auto_map.{auto_class}", ref
        elif key == "custom_pipelines" and isinstance(value, dict):
            for task, spec in value.items():
                if isinstance(spec, dict) and "impl" in spec:
                    yield f"{where} custom_pipelines.{task}.impl", spec["impl"]
        else:
            yield from _code_refs(value, where)


def _defined_names(code_file: str) -> set:
    """Top-level classes, functions and assigned names of this repository's copy of `code_file` (parsed, not
    imported)."""
    names = set()
    for node in ast.parse((utils.PACKAGE_DIR / code_file).read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def _relative_imports(code_file: str) -> set:
    """Files that this repository's copy of `code_file` imports relatively (`from .x import y` -> `x.py`)."""
    tree = ast.parse((utils.PACKAGE_DIR / code_file).read_text(encoding="utf-8"))
    return {
        f"{node.module}.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }


def _referenced_code_file(location: str, ref: Any) -> str:
    """The code file a reference points at, refusing anything but a class of this project's remote code."""
    if not isinstance(ref, str) or "." not in ref:
        raise ValidationError(f"{location} = {ref!r} is not a `module.Class` reference.")
    if "--" in ref:
        raise ValidationError(
            f"{location} = {ref!r} points at code in another Hub repository; only this folder's own remote code "
            f"({', '.join(utils.CODE_FILES)}) may be referenced."
        )
    module, _, name = ref.rpartition(".")
    code_file = f"{module}.py"
    if code_file not in utils.CODE_FILES:
        raise ValidationError(
            f"{location} = {ref!r} points at {code_file}, which is not this project's remote code "
            f"({', '.join(utils.CODE_FILES)})."
        )
    if name not in _defined_names(code_file):
        raise ValidationError(f"{location} = {ref!r}: {code_file} defines no {name}.")
    return code_file


def _check_code_references(folder: Path, files: List[str]) -> List[str]:
    """Check every remote-code reference of the folder's top-level JSON files; returns the code files they need
    (with the files those import), all of which must be present."""
    configs = {}
    for name in (f for f in files if f.endswith(".json") and "/" not in f):
        try:
            configs[name] = utils.read_json(folder / name)
        except utils.ConversionError as err:
            raise ValidationError(str(err)) from None
    for name, auto_class in (("config.json", "AutoModel"), ("preprocessor_config.json", "AutoImageProcessor")):
        if not (configs.get(name, {}).get("auto_map") or {}).get(auto_class):
            raise ValidationError(f"{name} has no auto_map.{auto_class}: the folder would not load with {auto_class}.")
    needed = {_referenced_code_file(loc, ref) for name, data in configs.items() for loc, ref in _code_refs(data, name)}
    pending = list(needed)
    while pending:
        for imported in _relative_imports(pending.pop()) - needed:
            needed.add(imported)
            pending.append(imported)
    missing = sorted(needed - set(files))
    if missing:
        raise ValidationError(f"Missing from {folder}: {', '.join(missing)} (remote code the configs refer to).")
    return sorted(needed)


def _check_files(folder: Path, files: List[str]) -> None:
    """Every file of a published format and no credential (see file_safety), safetensors weights, the configs and a
    model card with front matter."""
    try:
        file_safety.check_publishable(folder, files, utils.CODE_FILES)
    except file_safety.UnpublishableFiles as err:
        raise ValidationError(f"{folder}: {err}") from None
    if utils.WEIGHTS_NAME not in files and utils.WEIGHTS_INDEX_NAME not in files:
        raise ValidationError(f"No {utils.WEIGHTS_NAME} (or {utils.WEIGHTS_INDEX_NAME}) in {folder}.")
    required = ["config.json", "preprocessor_config.json", "processor_config.json", utils.MODEL_CARD]
    missing = [name for name in required if name not in files]
    if missing:
        raise ValidationError(f"Missing from {folder}: {', '.join(missing)}.")
    card = (folder / utils.MODEL_CARD).read_text(encoding="utf-8")
    if not card.startswith("---\n") or "library_name:" not in card.split("\n---", 2)[0]:
        raise ValidationError("README.md must start with YAML front matter declaring `library_name` (the model card).")


def _check_processor_configs(folder: Path) -> None:
    flat = utils.read_json(folder / "preprocessor_config.json")
    nested = utils.read_json(folder / "processor_config.json").get("image_processor")
    if nested != flat:
        raise ValidationError(
            "preprocessor_config.json and processor_config.json['image_processor'] differ; loaders that read one "
            "or the other would preprocess differently. Re-save the processor with save_pretrained()."
        )


def _sample_image(image: Optional[Path]):
    from PIL import Image

    if image is not None:
        return Image.open(image)
    examples = sorted((utils.PACKAGE_DIR / "examples").glob("*.jpg")) + sorted((utils.PACKAGE_DIR / "examples").glob("*.png"))
    if examples:
        return Image.open(examples[0])
    import numpy as np

    y, x = np.mgrid[0:480, 0:640]
    return Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype("uint8"))


def validate(folder, image: Optional[Path] = None) -> List[str]:
    """Check `folder` as described in the module docstring; returns the files that would be uploaded."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    folder = Path(folder)
    if not folder.is_dir():
        raise ValidationError(f"{folder} is not a folder.")
    files = folder_files(folder)
    # Static checks first: no code of the folder is imported or run before it is known to be the project's own.
    _check_code_files(folder)
    _check_files(folder, files)
    _check_code_references(folder, files)
    _check_processor_configs(folder)
    try:  # tensor names and shapes from the safetensors headers: a precise message before any loading
        checkpoint = utils.SafetensorsCheckpoint(folder)
        family = utils.family_of(utils.read_json(folder / "config.json").get("model_type"))
        expected = utils.expected_shapes(utils.config_class(family).from_pretrained(folder))
        utils.check_shapes(checkpoint.shapes(checkpoint.keys()), expected, str(folder))
    except utils.ConversionError as err:
        raise ValidationError(str(err)) from err
    except (OSError, ValueError) as err:
        raise ValidationError(f"{folder}/config.json does not give a valid configuration: {err}") from err

    try:
        model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    except (OSError, ValueError, ImportError, RuntimeError) as err:  # RuntimeError: transformers 5.x, wrong shapes
        raise ValidationError(f"{folder} does not load with the Auto API: {err}") from err
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)}
    if problems:
        raise ValidationError(f"The weights do not match the config: {problems}")
    try:  # every weight, not only those one sample forward pass happens to use
        for name, tensor in model.state_dict().items():
            utils.check_finite(name, tensor, f"in {folder}", why="refusing to publish it")
    except utils.ConversionError as err:
        raise ValidationError(str(err)) from err

    config = model.config
    disagree = [
        f"{name}: processor {getattr(processor, name, None)} vs model {getattr(config, name)}"
        for name in SETTINGS
        if getattr(processor, name, None) != getattr(config, name)
    ]
    if disagree:
        raise ValidationError("Processor and model settings disagree: " + "; ".join(disagree))

    inputs = processor(images=_sample_image(image), return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model(inputs["pixel_values"], inputs["grid_thws"], output_hidden_states=True)
    n = int(inputs["grid_thws"].prod(dim=-1).sum())
    if tuple(out.last_hidden_state.shape) != (n, config.hidden_size) or not torch.isfinite(out.last_hidden_state).all():
        raise ValidationError(f"Forward pass gave {tuple(out.last_hidden_state.shape)} features (or non-finite values).")
    if len(out.hidden_states) != config.num_hidden_layers + 1:
        raise ValidationError(f"Forward pass gave {len(out.hidden_states)} hidden states.")
    if model._pools_per_image() and out.pooler_output is None:
        raise ValidationError("The model has a pooling head but gave no pooled output.")
    if out.pooler_output is not None and not torch.isfinite(out.pooler_output).all():
        raise ValidationError("The pooled output is not finite.")
    print(
        f"Validated {folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"sample image -> grid {inputs['grid_thws'].tolist()} -> features {tuple(out.last_hidden_state.shape)}"
    )
    return files


def _operations(api, repo_id: str, folder: Path, files: List[str], delete_stale: bool) -> list:
    """One commit's operations: add exactly `files` (names taken literally, never as glob patterns: `*` or
    `photo[1].png` is that one file) and, with `delete_stale`, delete every other file of the repository except
    .gitattributes."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    if delete_stale:
        kept = {*files, ".gitattributes"}
        remote = api.list_repo_files(repo_id=repo_id, repo_type="model")
        operations += [CommitOperationDelete(path_in_repo=name) for name in sorted(remote) if name not in kept]
    return operations


def push(
    folder, repo_id: str, private: bool = False, dry_run: bool = False, image=None, commit_message=None, delete_stale=False
):
    """Validate `folder`, then (unless `dry_run`) create `repo_id` if needed and upload the validated files; with
    `delete_stale`, the same commit deletes every other file of the repository (except .gitattributes)."""
    folder = Path(folder)
    files = validate(folder, image=image)
    total = sum((folder / f).stat().st_size for f in files)
    action = "Would upload" if dry_run else "Uploading"
    print(f"{action} {len(files)} files ({total / 1e6:.1f} MB) to {repo_id} ({'private' if private else 'public'}):")
    for name in files:
        print(f"  {name}  ({(folder / name).stat().st_size:,} bytes)")
    if delete_stale:
        print("Every other file in the repository (except .gitattributes) is deleted in the same commit (--delete-stale).")
    else:
        print("Files already in the repository that are not listed are kept (--delete-stale removes them).")
    if dry_run:
        print("Dry run: nothing was uploaded.")
        return None
    api = HfApi()
    repo_url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.create_commit(
        repo_id=repo_id,
        repo_type="model",
        operations=_operations(api, repo_id, folder, files, delete_stale),
        commit_message=commit_message or "Upload siglip2-navit model",
    )
    print(f"Uploaded to {repo_url}")
    return commit


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", metavar="DIR", type=Path, help="model folder (e.g. the output of a convert script)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, `user-or-org/name`")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the file list, upload nothing")
    parser.add_argument("--image", type=Path, default=None, help="sample image for the test forward pass")
    parser.add_argument("--commit-message", default=None, help="commit message on the Hub")
    parser.add_argument(
        "--delete-stale",
        action="store_true",
        help="in the same commit, delete every file of the repository that is not uploaded (mirror the folder)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        push(args.dir, args.repo_id, args.private, args.dry_run, args.image, args.commit_message, args.delete_stale)
    except (ValidationError, utils.ConversionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
