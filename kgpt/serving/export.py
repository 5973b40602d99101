"""SavedModels for TensorFlow Serving: `export(run_dir, name)` publishes a run's
`kgpt.serving.serving_module.ServingModule` as `saved_models/NAME/VERSION/`, atomically and checked to
need no XLA (`xla_findings`); TF Serving's folder layout (versions), which the server and
`SavedModelGenerator` read; `signature_functions` for a loaded export's optional inputs.
"""

import errno
import os
import re

import tensorflow as tf

from kgpt.files import remove_stale, staged_directory
from kgpt.rundir import RunDirectory
from kgpt.serving.serving_module import ServingModule
from kgpt.serving.signatures import check_outputs, read_saved_model, read_signature_defs

DEFAULT_BASE_DIR = "saved_models"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Concurrent exports of one model each take the next free version; give up after this many.
_PUBLISH_ATTEMPTS = 100
_TAKEN = "{} already exists; versions are never overwritten. Leave --version out to write the next one."


def version_numbers(model_dir):
    """The numbered version folders of `saved_models/NAME`, ascending (none if absent)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(name) for name in os.listdir(model_dir) if name.isdigit())


def saved_model_version_path(path):
    """`path` if it holds `saved_model.pb`, else its highest version folder (FileNotFoundError: neither)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [
        v for v in version_numbers(path)
        if os.path.isfile(os.path.join(path, str(v), "saved_model.pb"))
    ]
    if not versions:
        raise FileNotFoundError(
            f"No SavedModel in {path}: expected saved_model.pb or numbered version folders "
            "written by 'kgpt export'."
        )
    return os.path.join(path, str(max(versions)))


def is_saved_model(path):
    """True if `path` is a SavedModel folder or a TF Serving model folder of versions."""
    try:
        saved_model_version_path(path)
        return True
    except FileNotFoundError:
        return False


def signature_functions(path, module=None):
    """An export's signatures as Python functions whose inputs may be left out, as in REST requests.

    `tf.saved_model.load(path).signatures[name]` needs every input: TensorFlow's loader drops the
    defaults that the SignatureDef records, which TF Serving's REST API (and `kgpt serve`) fill in.
    These functions fill them in too. Without kgpt, the loaded module's functions of the same names
    apply the same defaults: `tf.saved_model.load(path).beam_search(prompts=...)`.

    Args:
        path: a version folder or a model folder (its highest version).
        module: the SavedModel at `path`, already loaded (else it is loaded).

    Returns:
        `{signature name: function(**inputs) -> {output: tensor}}`, inputs as tensors, NumPy arrays
        or Python values.

    Example:
        signature_functions("saved_models/tiny")["beam_search"](prompts=["ROMEO:"])["beam_text"]
    """
    path = saved_model_version_path(path)
    module = tf.saved_model.load(path) if module is None else module
    signature_defs = read_signature_defs(path)

    def with_defaults(name):
        function, signature_def = module.signatures[name], signature_defs[name]

        def call(**inputs):
            unknown = sorted(set(inputs) - set(signature_def.inputs))
            missing = sorted(set(signature_def.inputs) - set(inputs) - set(signature_def.defaults))
            if unknown or missing:
                raise ValueError(
                    f"Signature {name!r} takes the inputs {sorted(signature_def.inputs)}, of which "
                    f"{sorted(signature_def.defaults)} have defaults; got unknown {unknown}, missing "
                    f"{missing}."
                )
            defaults = {key: tf.make_ndarray(value) for key, value in signature_def.defaults.items()}
            return function(**{
                key: tf.constant(value, tf.dtypes.as_dtype(signature_def.inputs[key].dtype))
                for key, value in {**defaults, **inputs}.items()
            })

        return call

    return {name: with_defaults(name) for name in module.signatures}


def _graphs(saved_model_dir):
    """`(name, attributes, nodes)` of every graph of `saved_model.pb` and of every library function."""
    for meta_graph in read_saved_model(saved_model_dir).meta_graphs:
        yield "graph", {}, meta_graph.graph_def.node
        for function in meta_graph.graph_def.library.function:
            yield function.signature.name, function.attr, function.node_def


def xla_findings(saved_model_dir):
    """Returns what in `saved_model.pb` would need XLA: `Xla*` ops and must-compile functions."""
    findings = []
    for where, attributes, nodes in _graphs(saved_model_dir):
        for key in ("_XlaMustCompile", "_noinline_xla_compile"):
            if key in attributes and attributes[key].b:
                findings.append(f"function {where} has {key}")
        for node in nodes:
            if node.op.startswith("Xla") or node.op == "_XlaCompile":
                findings.append(f"op {node.op} ({node.name} in {where})")
            if "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b:
                findings.append(f"node {node.name} in {where} is must-compile")
    return findings


def operations(saved_model_dir):
    """The set of op names used in `saved_model.pb`, function library included."""
    return {node.op for _, _, nodes in _graphs(saved_model_dir) for node in nodes}


def check_saved_signatures(contract, saved_model_dir):
    """Raises `ValueError` unless the SavedModel's SignatureDefs output what `contract` (a list of
    `kgpt.serving.signatures.Signature`) declares."""
    signature_defs = read_signature_defs(saved_model_dir)
    for signature in contract:
        outputs = signature_defs[signature.name].outputs
        check_outputs(signature, {
            name: tf.TensorSpec(tf.TensorShape(info.tensor_shape), tf.as_dtype(info.dtype))
            for name, info in outputs.items()
        })


def publish(module, model_dir, version=None):
    """Saves a `ServingModule` as `model_dir/VERSION/`, atomically; returns that path.

    Written into a staging folder (TF Serving ignores it: not a number), checked to need no XLA
    (unless the module's `jit_compile` asks for it), and renamed into place with the umask's
    permissions, so TF Serving running as another user can read it. Without `version`, the next
    free number, moving on if another export takes it meanwhile.
    """
    model_dir = os.fspath(model_dir)
    fixed = version is not None
    if fixed and int(version) < 1:
        raise ValueError(f"version={version} must be a positive integer.")
    remove_stale(model_dir)
    version = int(version) if fixed else (version_numbers(model_dir) or [0])[-1] + 1
    for _ in range(_PUBLISH_ATTEMPTS):
        final = os.path.join(model_dir, str(version))
        if not os.path.exists(final):
            try:
                with staged_directory(final, replace=False) as staging:
                    tf.saved_model.save(module, staging, signatures=module.signatures())
                    check_saved_signatures(module.contract(), staging)
                    findings = xla_findings(staging)
                    if findings and not module.jit_compile:
                        raise RuntimeError(f"The graph needs XLA, which TF Serving runs without: {findings}")
                return final
            except OSError as error:
                # Another export published this version while we wrote ours.
                taken = error.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(final)
                if not taken:
                    raise ValueError(f"Could not publish {final}: {error}") from error
        if fixed:
            raise ValueError(_TAKEN.format(final))
        version = max(version_numbers(model_dir) + [version]) + 1
    raise ValueError(
        f"Could not publish a version of {model_dir}: {_PUBLISH_ATTEMPTS} versions were taken by "
        "other exports while this one was written; retry."
    )


def export(run_dir, name, base_dir=DEFAULT_BASE_DIR, version=None, max_new_tokens=None,
           jit_compile=False):
    """Exports a run directory's model and tokenizer as `base_dir/name/version/`; returns that path.

    Args:
        name: the model name TF Serving serves it under (`/v1/models/NAME`).
        version: a positive int; default: the next free one (see `publish`).
        max_new_tokens: new tokens per prompt of `serving_default`, and `generate`'s default.
        jit_compile: an XLA-compiled decode loop, for servers that run XLA (see `ServingModule`).

    Example:
        export("checkpoints/shakespeare_char", "shakespeare")  # saved_models/shakespeare/1
    """
    if not _NAME.match(name or ""):
        raise ValueError(
            f"Model name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a folder "
            "and a URL path element)."
        )
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(
            f"No run directory at {run_dir}; pass a folder written by 'kgpt train' (or "
            "'kgpt import-gpt2')."
        )
    model_dir = os.path.join(base_dir, name)
    if version is not None:
        if int(version) < 1:
            raise ValueError(f"version={version} must be a positive integer.")
        final = os.path.join(model_dir, str(int(version)))
        if os.path.exists(final):  # before the model is loaded
            raise ValueError(_TAKEN.format(final))
    run = RunDirectory(run_dir)
    tokenizer = run.load_tokenizer()
    problem = tokenizer.graph_problem()
    if problem:
        raise ValueError(f"Cannot export {run_dir}: the SavedModel tokenizes in its graph, and {problem}.")
    module = ServingModule(
        run.load_model(), tokenizer, max_new_tokens=max_new_tokens, jit_compile=jit_compile
    )
    return publish(module, model_dir, version)
