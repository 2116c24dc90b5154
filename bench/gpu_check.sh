#!/usr/bin/env bash
# The GPU check: actmap on one CUDA GPU, in under 8 minutes, every step's output in $OUT.
#
#   1. env            the GPU, torch, pyarrow, Ray, the project importable from the tree
#   2. cuda_sanity    ActivationMapGrabber on resnet50: CUDA equals the CPU (fp32, TF32 off);
#                     bf16 + channels_last close to it; no hook left on the model
#   3. cuda_pipeline  pipeline.run on the GPU, bf16 + channels_last, 2048 generated 224 px
#                     images; read back (actmap and plain pyarrow), rows compared to a direct forward
#   4. bench_pipeline resnet50, 224 px, batch 256, bf16, channels_last, 4096 images: raw forward,
#                     hooks, actmap, Ray Data (generated source: the actors generate the images)
#   5. bench_pipeline the same with the memory source (actors read the images from a .npy), no Ray Data
#   6. bench_encoding the design table's batch of 256 on this host's cores
#   7. jpeg_folder    16,384 JPEG files of 500x375 (4,096 images, each in 4 files, one of them CMYK), decoded on the GPU,
#                     through resnet50 layer3 + layer4,
#                     full maps, pooled to 1x1 (input-bound), and pooled by one actor holding the
#                     whole GPU: images/s; a few rows against a CPU decode + direct forward, every pooled
#                     row against the same GPU decoding batch by batch
#   8. bench_sources  the input path on this host: floors and sources alone, 1 and all threads
#   9. gpu_profile    each stage of the JPEG-folder dump alone (read, GPU decode, resize, forward,
#                     copy out, write), then ShardWorker with 4 shards at once, in one process
#  10. arenas         step 7's pooled dump with one malloc arena per CPU (a local Ray's), then with
#                     glibc's 8 per core: images/s and the actor's peak memory
#
# STEPS="1 7 8" runs only those steps. All of them take longer than one device call may (10
# minutes): run them in two calls on one warm machine, STEPS="1 3 7 9 10" BUDGET=500 then
# STEPS="2 4 5 8 6" BUDGET=500 (step 9 reads step 7's files; the eighth run, bench/RESULTS-gpu.md,
# covered every step but 9 at commit bab70b3).
#
# On the GPU machine (torch and pyarrow there, Ray from .gpu-carry/), from the repository root:
#   bash .gpu-carry/install.sh && export PYTHONPATH=$PWD/.gpu-carry/site && bash bench/gpu_check.sh
# A dry run of every step's Python on the CPU, tiny sizes (here, with the project's venv):
#   PYTHON=.venv/bin/python OUT=/tmp/gpu-dry bash bench/gpu_check.sh --cpu-dry-run
#
# A failing step does not stop the others; summary.txt lists each step's exit status (124: its
# time limit). The dumps go to $WORK (default /tmp/actmap-gpu-check) and are deleted at the end;
# only logs and one JSON go to $OUT (at most 8 files: the short steps' logs end up in one).

set -uo pipefail
set -x

cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; fi

OUT=${OUT:-$PWD/gpu-check-out}
WORK=${WORK:-/tmp/actmap-gpu-check}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-465}   # seconds for all steps together
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}   # the local Ray started here listens on loopback only
export PYTHONUNBUFFERED=1

if [[ $DRY == 1 ]]; then
  export DEVICE=cpu MODEL=resnet50 SIZE=64 COUNT=64 BATCH=16 BENCH_COUNT=64 SHARD=32 JPEG_COUNT=128
  BENCH_EXTRA=(--actors 1 --device cpu)
  ENC_ARGS=(--batch 4 --repeats 1)
  SOURCES_ARGS=(--rows 2000 --files 1000)
  PROFILE_ARGS=(--device cpu --count 64 --batch 16 --size 64 --width 100 --height 80 --repeats 1 --threads 2)
else
  export DEVICE=cuda MODEL=resnet50 SIZE=224 COUNT=2048 BATCH=256 BENCH_COUNT=4096 SHARD=1024 JPEG_COUNT=16384
  BENCH_EXTRA=(--actors 1 --device cuda)
  ENC_ARGS=(--full --repeats 1)
  SOURCES_ARGS=(--rows 40000 --files 20000)
  PROFILE_ARGS=(--device cuda --count 8192)
fi
export WORK

: > "$OUT/summary.txt"
STEPS=${STEPS:-}  # e.g. STEPS="1 7 8": only those steps (default: all)
step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, output to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  if [[ -n $STEPS && " $STEPS " != *" ${name%%_*} "* ]]; then
    return
  fi
  local left=$((BUDGET - SECONDS - 5))
  if ((left < 20)); then
    echo "$name: skipped, ${left}s of the budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
  tail -n 30 "$OUT/$name.log"
}

# -- 1. the environment -----------------------------------------------------------------------------
env_report() {
  if [[ $DRY == 0 ]]; then nvidia-smi || true; fi
  nproc; free -g || true
  "$PY" - <<'EOF'
import os, sys
import numpy, pyarrow, torch, torchvision
print("python", sys.version.split()[0], "numpy", numpy.__version__, "pyarrow", pyarrow.__version__,
      "torch", torch.__version__, "torchvision", torchvision.__version__)
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import ray, yaml
print("ray", ray.__version__, "from", ray.__file__)
import extender, pipeline
print("actmap from", pipeline.__file__)
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit("DEVICE=cuda but torch sees no GPU")
EOF
}
export -f env_report
export DRY PY
step 1_env 40 bash -c env_report

# -- 2. the grabber on CUDA against the CPU ---------------------------------------------------------
step 2_cuda_sanity 75 "$PY" - <<'EOF'
import copy, os, sys
import torch, torchvision
from extender import ActivationMapGrabber

device, name, size = os.environ["DEVICE"], os.environ["MODEL"], int(os.environ["SIZE"])
torch.backends.cudnn.allow_tf32 = False        # fp32 on both sides, so they may be compared closely
torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)
model = torchvision.models.get_model(name, weights=None).eval()
x = torch.randn(8, 3, size, size)
layers = ["layer1", "layer3", "layer4"]

def grab(device, bf16=False, channels_last=False, stop_early=False):
    m = copy.deepcopy(model).to(device)
    inp = x.to(device)
    if channels_last:
        m, inp = m.to(memory_format=torch.channels_last), inp.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    with ActivationMapGrabber(m, layers, detach=True, stop_early=stop_early) as g, torch.inference_mode(), ctx:
        out, maps = g(inp)
        assert all(v.device.type == device for v in maps.values()), "a map is not on the device"
    left = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())
    assert left == 0, f"{left} hooks left on the model"
    return (None if out is None else out.float().cpu()), {k: v.float().cpu() for k, v in maps.items()}

def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

ref_out, ref = grab("cpu")
failures = []
for label, kwargs, tol in [("fp32", {}, 1e-3), ("fp32 stop_early", {"stop_early": True}, 1e-3),
                           ("bf16 + channels_last", {"bf16": True, "channels_last": True}, 0.1)]:
    out, maps = grab(device, **kwargs)
    errs = {k: rel(maps[k], ref[k]) for k in layers}
    if out is not None:
        errs["output"] = rel(out, ref_out)
    ok = all(e <= tol for e in errs.values()) and list(maps) == layers
    print(f"{device} vs cpu, {label}: max |diff| / max |cpu| = "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + f" (tolerance {tol:g}) {'OK' if ok else 'FAIL'}")
    if not ok:
        failures.append(label)
sys.exit(f"FAILED: {failures}" if failures else 0)
EOF

# -- 3. pipeline.run on the GPU, read back, compare with a direct forward ---------------------------
step 3_cuda_pipeline 110 "$PY" - <<'EOF'
import glob, json, os, shutil, sys, time
import numpy as np, pyarrow.parquet as pq, torch
import pipeline
from pipeline._models import LayerOutputs, build_model
from pipeline._preprocess import to_model_input
from pipeline._reduce import reduce_output
from pipeline._sources.generated import generate

device, name = os.environ["DEVICE"], os.environ["MODEL"]
size, count, batch = int(os.environ["SIZE"]), int(os.environ["COUNT"]), int(os.environ["BATCH"])
out = os.path.join(os.environ["WORK"], "cuda-pipeline")
shutil.rmtree(out, ignore_errors=True)
cfg = pipeline.load_config(None, [f"model.name={name}", "model.layers=[layer3, layer4]", "model.precision=bf16",
                                  "model.channels_last=true", f"source.count={count}", f"source.image_size={size}",
                                  f"run.output={out}", f"run.batch_size={batch}", "run.shard_size=512"])
summary = pipeline.run(cfg, stream=None)
print(summary.format())
failures = []
if summary.rows != {"layer3": count, "layer4": count} or summary.bad:
    failures.append(f"rows {summary.rows}, bad {len(summary.bad)}")
records = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/_actmap/shards/*.json"))]
devices = {r["worker"]["device"] for r in records}
print("actor devices:", devices, "; seconds summed over shards:",
      {k: round(sum(r["seconds"][k] for r in records), 2) for k in ("load_wait", "forward", "write_wait", "total")})
if device == "cuda" and not all(d.startswith("cuda") for d in devices):
    failures.append(f"the actors ran on {devices}, not the GPU")

rows = sorted({0, 1, count // 2 + 1, count - 1})
model = build_model(cfg.model).to(memory_format=torch.channels_last).to(device)
grab = LayerOutputs(model, cfg.model)
pixels = torch.stack([generate(i, size, cfg.source.seed)[0] for i in rows]).to(device)
x = to_model_input(pixels, cfg.source.preprocess.mean_std(), True)
with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
    direct = {k: reduce_output(v, cfg.dump, k).float().cpu().numpy() for k, v in grab(x).items()}
grab.remove()
for layer in cfg.model.layers:
    table = pipeline.read_table(out, layer, columns=["sample_id", "index"])
    if table.column("index").to_pylist() != list(range(count)) or len(set(table.column("sample_id").to_pylist())) != count:
        failures.append(f"{layer}: the indices or ids are not each sample once")
    stored = pipeline.read_layer(out, layer)
    got = stored[rows].astype(np.float32)
    err = float(np.abs(got - direct[layer]).max() / max(np.abs(direct[layer]).max(), 1e-12))
    ok = stored.dtype == np.float16 and stored.shape[0] == count and err <= 0.05
    print(f"{layer}: stored {stored.shape} {stored.dtype}; rows {rows} vs a direct forward: "
          f"max |diff| / max = {err:.2e} (tolerance 0.05) {'OK' if ok else 'FAIL'}")
    if not ok:
        failures.append(layer)
    # the same rows without actmap: pyarrow and numpy only
    first = sorted(glob.glob(f"{out}/layer={layer}/part-*.parquet"))[0]
    t = pq.read_table(first)
    meta = json.loads(t.schema.metadata[b"actmap"])["columns"]["activation"]
    plain = np.frombuffer(t.column("activation").combine_chunks().buffers()[1], dtype=meta["dtype"])
    plain = plain.reshape((t.num_rows, *meta["shape"]))
    if not np.array_equal(plain, stored[t.column("index").to_numpy()]):
        failures.append(f"{layer}: plain pyarrow read differs from pipeline.read_layer")
shutil.rmtree(out, ignore_errors=True)
sys.exit(f"FAILED: {failures}" if failures else 0)
EOF

# -- 4, 5. the pipeline benchmark -------------------------------------------------------------------
IMAGES="$WORK/images-$MODEL-$SIZE-$BENCH_COUNT.npy"   # generated once, shared by both runs
step 4_bench_pipeline 150 "$PY" bench/bench_pipeline.py --model "$MODEL" --size "$SIZE" --count "$BENCH_COUNT" \
  --batch "$BATCH" --precision bf16 --channels-last --shard-size "$SHARD" "${BENCH_EXTRA[@]}" \
  --images "$IMAGES" --workdir "$WORK" --json "$OUT/4_bench_pipeline.json"
step 5_bench_pipeline_memory 80 "$PY" bench/bench_pipeline.py --model "$MODEL" --size "$SIZE" --count "$BENCH_COUNT" \
  --batch "$BATCH" --precision bf16 --channels-last --shard-size "$SHARD" "${BENCH_EXTRA[@]}" \
  --images "$IMAGES" --workdir "$WORK" --source memory --no-raydata


# -- 7. a folder of JPEG files: decoded on the GPU, dumped, compared with a CPU decode --------------
step 7_jpeg_folder 210 "$PY" - <<'EOF'
import glob, json, os, shutil, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np, torch, torchvision.io as tvio
import pipeline
from pipeline._decoder import Decoder
from pipeline._models import LayerOutputs, build_model
from pipeline._images import decode
from pipeline._preprocess import resize_crop, to_model_input
from pipeline._reduce import reduce_output
from pipeline._sources.generated import generate

device, name = os.environ["DEVICE"], os.environ["MODEL"]
batch, work = int(os.environ["BATCH"]), os.environ["WORK"]
root = os.path.join(work, "jpegs")

count, distinct = int(os.environ["JPEG_COUNT"]), int(os.environ["BENCH_COUNT"])

def make(i):  # a photo-sized (500x375) JPEG in one of 8 class folders; past `distinct`, copies
    path = f"{root}/{i % 8}/{i:06d}.jpg"
    if i == 5:  # one CMYK file (with its copies, one in 4,096), which the GPU decoder may refuse
        from PIL import Image
        Image.fromarray(generate(i, 500, 0)[0][:, :375, :].permute(1, 2, 0).numpy()).convert("CMYK").save(
            path, quality=90)
    elif i < distinct:
        tvio.write_jpeg(generate(i, 500, 0)[0][:, :375, :].contiguous(), path, quality=90)
    else:
        shutil.copyfile(f"{root}/{i % distinct % 8}/{i % distinct:06d}.jpg", path)

for k in range(8):
    os.makedirs(f"{root}/{k}", exist_ok=True)
t0 = time.perf_counter()
with ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(make, range(distinct)))
    list(pool.map(make, range(distinct, count)))
files = sorted(glob.glob(f"{root}/*/*.jpg"))
print(f"{count} JPEG files of 500x375 ({distinct} distinct images), {sum(map(os.path.getsize, files)) / count / 1e3:.0f} "
      f"KB each, made in {time.perf_counter() - t0:.1f}s")
failures = []
# with 16 host cores or more, two actors share the GPU by default, each with half of them (two
# processes, two interpreter locks); the third dump is the same with one actor holding it all
whole = ["run.gpus_per_actor=1"] if device == "cuda" else ["run.actors=1"]
variants = (("full maps", []), ("pooled to 1x1", ["dump.reduce=pool"]),
            ("pooled to 1x1, one actor of the whole GPU", ["dump.reduce=pool", *whole]))
dumps = {}
for label, extra in variants:
    out = os.path.join(work, f"jpeg-dump-{len(dumps)}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = pipeline.load_config(None, [
        f"model.name={name}", "model.layers=[layer3, layer4]", "model.precision=bf16", "model.channels_last=true",
        "source.kind=folder", f"source.path={root}", "source.preprocess.resize=256", "source.preprocess.crop=224",
        f"run.output={out}", f"run.batch_size={batch}", f"run.shard_size={4 * batch}", *extra])
    t0 = time.perf_counter()
    summary = pipeline.run(cfg, stream=None)
    wall = time.perf_counter() - t0
    print(summary.format())
    records = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/_actmap/shards/*.json"))]
    busy = max(r["finished"] for r in records) - min(r["started"] for r in records)
    print(f"{label}: {summary.actors} actor(s); seconds summed over shards:", {k: round(sum(r["seconds"][k] for r in records), 2)
          for k in ("load_wait", "device_wait", "forward", "write_wait", "total")},
          "workers:", {(r["worker"]["device"], r["worker"].get("decode_threads")) for r in records})
    print(f"JPEG folder, {name} layer3+layer4 bf16, {label}: {count / wall:.0f} images/s end to end "
          f"({wall:.1f} s, start-up included); {count / busy:.0f} images/s from the first shard's start to "
          f"the last one's end; {sum(summary.bytes.values()) / busy / 1e9:.2f} GB/s written")
    if summary.rows != {"layer3": count, "layer4": count} or summary.bad:
        failures.append(f"{label}: rows {summary.rows}, bad {summary.bad[:3]}")
    dumps[label] = (out, cfg)
out, cfg = dumps["full maps"]
# a few rows against a CPU decode and a direct forward (the GPU and CPU JPEG decoders differ a little)
rows = [0, count // 2, count - 1]
model = build_model(cfg.model).to(memory_format=torch.channels_last).to(device)
grab = LayerOutputs(model, cfg.model)
ids = pipeline.read_table(out, "layer4", columns=["sample_id"]).column("sample_id").to_pylist()
pixels = torch.stack([resize_crop(decode(open(os.path.join(root, ids[i]), "rb").read()), 256, (224, 224))
                      for i in rows]).to(device)
x = to_model_input(pixels, cfg.source.preprocess.mean_std(), True)
with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
    direct = {k: reduce_output(v, cfg.dump, k).float().cpu().numpy() for k, v in grab(x).items()}
for layer in ("layer3", "layer4"):
    got = pipeline.read_layer(out, layer)[rows].astype(np.float32)
    err = float(np.abs(got - direct[layer]).max() / max(np.abs(direct[layer]).max(), 1e-12))
    print(f"{layer}: rows {rows} vs a CPU decode + direct forward: max |diff| / max = {err:.2e} "
          f"(tolerance 0.1) {'OK' if err <= 0.1 else 'FAIL'}")
    if err > 0.1:
        failures.append(layer)
# every row of the pooled dump against the same GPU decoding and model, one batch at a time with
# nothing beside them: a decode that raced a forward, or memory reused too early, shows here
out, cfg = dumps["pooled to 1x1"]
ids = pipeline.read_table(out, "layer4", columns=["sample_id"]).column("sample_id").to_pylist()
pooled = {label: pipeline.read_layer(o, "layer4").astype(np.float32).reshape(count, -1)
          for label, (o, _) in dumps.items() if label.startswith("pooled")}
decoder = Decoder(1, device, resize=256, crop=(224, 224))
worst = dict.fromkeys(pooled, 0.0)
for start in range(0, count, batch):
    images = decoder([open(os.path.join(root, i), "rb").read() for i in ids[start:start + batch]])
    x = to_model_input(torch.stack(images), cfg.source.preprocess.mean_std(), True)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        ref = reduce_output(grab(x)["layer4"], cfg.dump, "layer4").float().cpu().numpy().reshape(len(images), -1)
    for label, stored in pooled.items():
        err = np.abs(stored[start:start + batch] - ref).max(axis=1) / np.maximum(np.abs(ref).max(axis=1), 1e-12)
        worst[label] = max(worst[label], float(err.max()))
for label, w in worst.items():
    print(f"{label}, layer4, all {count} rows vs the same GPU decoding + forward, batch by batch: worst row "
          f"max |diff| / max = {w:.2e} (tolerance 0.05) {'OK' if w <= 0.05 else 'FAIL'}")
    if w > 0.05:
        failures.append(f"{label}: rows")
sys.exit(f"FAILED: {failures}" if failures else 0)
EOF

# -- 8. the input path on this host's cores: floors and sources alone, 1 and all threads ------------
step 8_bench_sources 240 "$PY" bench/bench_sources.py --kinds parquet,folder,webdataset --no-e2e --no-raydata \
  --plan-files 0 "${SOURCES_ARGS[@]}" --workdir "$WORK/sources" --json "$OUT/8_bench_sources.json"

# -- 9. each stage of the JPEG-folder dump alone, then the worker without Ray ---------------------
step 9_gpu_profile 150 "$PY" bench/gpu_profile.py "${PROFILE_ARGS[@]}" --images "$WORK/jpegs" \
  --workdir "$WORK/profile" --json "$OUT/9_gpu_profile.json"

# -- 6. the encodings on this host ------------------------------------------------------------------
step 6_bench_encoding 60 "$PY" bench/bench_encoding.py "${ENC_ARGS[@]}" --dir "$WORK"

# -- 10. what one malloc arena per CPU costs with many threads: step 7's pooled dump, both ways ------
step 10_arenas 120 "$PY" - <<'EOF'
import glob, json, os, shutil
import pipeline
from pipeline._ray_executor import local_ray_environment

work, root = os.environ["WORK"], os.path.join(os.environ["WORK"], "jpegs")
if not os.path.isdir(root):
    raise SystemExit("no JPEG folder: step 7 makes it")
count = len(glob.glob(f"{root}/*/*.jpg"))
rule = local_ray_environment()["MALLOC_ARENA_MAX"]
glibc = str(8 * (os.cpu_count() or 1))  # glibc's own limit: 8 per core
rates = {}
for arenas in (rule, glibc):  # the local Ray each run starts takes the variable (~20 s of start-up each)
    os.environ["MALLOC_ARENA_MAX"] = arenas
    out = os.path.join(work, "arenas-dump")
    shutil.rmtree(out, ignore_errors=True)
    cfg = pipeline.load_config(None, [
        f"model.name={os.environ['MODEL']}", "model.layers=[layer3, layer4]", "model.precision=bf16",
        "model.channels_last=true", "source.kind=folder", f"source.path={root}", "source.preprocess.resize=256",
        "source.preprocess.crop=224", f"run.output={out}", f"run.batch_size={os.environ['BATCH']}",
        f"run.shard_size={4 * int(os.environ['BATCH'])}", "dump.reduce=pool"])
    summary = pipeline.run(cfg, stream=None)
    records = [json.load(open(p)) for p in glob.glob(f"{out}/_actmap/shards/*.json")]
    busy = max(r["finished"] for r in records) - min(r["started"] for r in records)
    peak = max(r["worker"]["max_rss_mb"] for r in records)
    rates.setdefault(arenas, []).append(count / busy)
    print(f"MALLOC_ARENA_MAX={arenas}: {count / busy:.0f} images/s from the first shard's start to the last one's "
          f"end, actor peak {peak:.0f} MB, {summary.rows}")
print("; ".join(f"{a} arenas: " + " / ".join(f"{r:.0f}" for r in v) + " images/s" for a, v in rates.items()))
EOF

rm -rf "$WORK"
set +x
echo "== summary (${SECONDS}s)"; cat "$OUT/summary.txt"
for f in "$OUT"/4_bench_pipeline.log "$OUT"/5_bench_pipeline_memory.log; do
  [[ -f $f ]] && { echo "== $f"; grep -v "^\s*$" "$f" | grep -E "^\||^resnet|^fixed|^actmap:" | tail -n 25; }
done
# the device tool brings back at most 8 files: the short logs go into one
for f in "$OUT"/1_env.log "$OUT"/2_cuda_sanity.log "$OUT"/3_cuda_pipeline.log "$OUT"/6_bench_encoding.log \
         "$OUT"/10_arenas.log; do
  [[ -f $f ]] && { echo "=== $(basename "$f")"; cat "$f"; } >> "$OUT/short_steps.log" && rm "$f"
done
! grep -q "rc=[1-9]" "$OUT/summary.txt"
