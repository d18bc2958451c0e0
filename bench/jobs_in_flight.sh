#!/usr/bin/env bash
# Time a real daemon on a folder of files with jobs_in_flight=N, the batched engine, and check that
# the transcripts do not depend on N.
#
#   bench/jobs_in_flight.sh 1 4        # each N in turn; then the outputs of every N are compared
#
# MODEL (default: the CTranslate2 base that bench/compare.py prepares in bench/.cache/models/base-ct2)
# and AUDIO (default: bench/.cache/audio, made by bench/compare.py, plus tests/fixtures/jfk.flac) may
# be set in the environment. Prints one line per N: files, seconds from the drop to the last output,
# and how many batches held several files.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${MODEL:-$root/bench/.cache/models/base-ct2}
audio=${AUDIO:-$root/bench/.cache/audio}
whisperd=$root/.venv/bin/whisperd
work=$(mktemp -d /tmp/whisperd-jif.XXXXXX)
trap 'rm -rf "$work"' EXIT
for n in "$@"; do
  d=$work/n$n
  mkdir -p "$d/inbox" "$d/stage"
  cat > "$d/config.yaml" <<YAML
state_dir: $d/state
model_dir: $work/models
device: cpu
torch_threads: 2
jobs_in_flight: $n
log_format: json
preload_models: [$model]
defaults: {model: $model, engine: batched, beam_size: null, best_of: null, temperature: 0,
           condition_on_previous_text: false, language: en, output_formats: [txt], on_success: delete}
folders: [{name: m, inbox: $d/inbox, outbox: $d/out, failed: $d/failed, stability_delay: 0.5s}]
YAML
  "$whisperd" run --config "$d/config.yaml" > "$d/log.json" 2>&1 &
  pid=$!
  until grep -q '"event": "ready"' "$d/log.json"; do sleep 0.2; done
  cp "$audio"/*.wav "$audio"/*.flac "$audio"/*.mp3 "$audio"/*.ogg "$root/tests/fixtures/jfk.flac" "$d/stage/" 2>/dev/null || true
  count=$(ls "$d/stage" | wc -l)
  start=$(date +%s%N)
  mv "$d/stage"/* "$d/inbox/"
  until [ "$(ls "$d/out" 2>/dev/null | wc -l)" -ge "$count" ]; do sleep 0.2; done
  end=$(date +%s%N)
  ms=$(( (end - start) / 1000000 ))
  echo "jobs_in_flight=$n files=$count seconds=$((ms / 1000)).$(printf '%03d' $((ms % 1000))) shared_batches=$(grep -c batch_gathered "$d/log.json" || true)"
  kill -TERM "$pid"; wait "$pid" || true
done
first=$1
for n in "$@"; do
  diff -r "$work/n$first/out" "$work/n$n/out" > /dev/null && echo "outputs of $n = outputs of $first" \
    || echo "outputs of $n DIFFER from outputs of $first"
done
