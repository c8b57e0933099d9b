"""Many objects through a whole stack: ours vs Meta's reference, same weights, same frames, same run.

    .venv/bin/python benchmarks/bench_many_objects.py                      # 1024 px, 40 slices, N = 1 5 20
    .venv/bin/python benchmarks/bench_many_objects.py --reference-objects 1 5   # reference for N=20 extrapolated
    .venv/bin/python benchmarks/bench_many_objects.py --size 256 --slices 6 --objects 1 2   # a smoke test

What is timed: segmenting a generated nuclei stack (napari_sam2.sample_data.nuclei_3d scaled
to --size, --slices deep) with N objects, each clicked once at the central pixel
(evaluate.central_pixel) of its largest slice; the N objects are the stack's N largest nuclei.

- reference: Meta's sam2==1.1.0 video predictor: init_state on a folder of JPEG slices, the N
  clicks, then its propagate_in_video over all objects forward and again with reverse=True
  from the same start (its default start: the earliest prompted slice of any object). It
  tracks the objects one after another on each slice.
- ours: StackSession on the same JPEG slices, decoded once (identical pixels), each object
  tracked from its own clicked slice, objects that step on a slice batched;
  float32 and fast mode (bfloat16 autocast), without and with early stop
  (stop_after_absent=--stop-after, the widget's default for z stacks).

Weights: sam2.1_hiera_tiny with seeded random weights built by the parity helpers
(tests/_reference.py), copied key by key into ours. Random weights are as fast as trained
ones, but their object score says nothing about the object:
- bias +8 on the object-score head (as the parity tests do): every object is "present"
  everywhere, so early stop never triggers (it must then cost what no stop costs);
- a calibrated bias b: with random weights the score drifts by a few thousandths per slice
  with the distance from the clicked slice, so a bias near 0 makes the stop trigger some
  slices away from the click. b is chosen (from up to --calibration-rounds pilot
  propagations of the largest object, no stop; see calibrate_rounds) so that the mean
  number of slices computed per object matches what a model that stops where the object
  ends would compute: the object's true z extent plus --stop-after slices at each end. The
  stop point is then tied to the distance from the click, not to the object; with trained
  weights (the bundled nano model) the stop happens where nuclei end:
  benchmarks/many_objects_quality.py measures that. Slices actually computed are reported.
  --stop-bias B skips the pilot and uses B.

Each measurement runs in a fresh process, so that its peak resident memory (VmHWM; on CUDA
torch.cuda.max_memory_allocated) is its own. Times are wall-clock seconds from
init_state / session creation to the last slice (the reference's include reading its
JPEG folder, reported separately). Ratios are the reference's time over ours, same run.

Cost: on a 2-core CPU at 1024 px both the reference and ours in float32 take about 6-7 s per
object per slice once the memory bank is full, so the whole default matrix takes hours;
choose a subset with --objects, --reference-objects, --ours and --positive-stop-objects.
On a shared machine, --threads 1 keeps timings from collapsing under contention.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_video import write_jpegs  # (0.jpg, 1.jpg... and what PIL decodes from them)

MODEL = "sam2.1_hiera_tiny"
SEED = 0
POSITIVE_BIAS = 8.0  # tests/_reference.py's default: objects "present" everywhere
OURS = ("f32", "f32-stop", "fast", "fast-stop")


# ---------------------------------------------------------------------------- data


def make_stack(size: int, depth: int, n_objects: int, seed: int):
    """The generated nuclei stack scaled to ``size`` px: (uint16 image, labels, nuclei count).

    nuclei_3d's defaults are 14 nuclei of 14-26 px radius on 192 px slices; the radii scale
    with size/192, and for more than ~9 objects asked for there are 1.5x as many nuclei,
    smaller by sqrt(14/n) so that they cover the same share of the slice."""
    from napari_sam2.sample_data import nuclei_3d

    n = max(14, math.ceil(1.5 * n_objects))
    r = (size / 192) * math.sqrt(14 / n)
    image, labels = nuclei_3d((depth, size, size), n, seed, radius_xy=(14 * r, 26 * r))
    return image, labels, n


def to_uint8(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (0.5, 99.8))
    return np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255).round().astype(np.uint8)


def make_clicks(labels: np.ndarray, n: int):
    """The n largest nuclei: id, largest slice, central pixel there, z extent."""
    from napari_sam2.model.evaluate import central_pixel

    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    if len(ids) < n:
        raise SystemExit(f"the generated stack holds only {len(ids)} nuclei, fewer than the {n} objects asked for")
    clicks = []
    for k in ids[np.argsort(-counts, kind="stable")][:n]:
        gt = labels == k
        area = gt.sum(axis=(1, 2))
        z = int(np.argmax(area))
        present = np.flatnonzero(area)
        clicks.append({"id": int(k), "z": z, "xy": list(central_pixel(gt[z])),
                       "z0": int(present[0]), "z1": int(present[-1])})
    return clicks


def realistic_slices(c, depth: int, stop: int) -> int:
    """Slices a model that stops ``stop`` slices past each end of the object computes."""
    return min(c["z1"] + stop, depth - 1) - max(c["z0"] - stop, 0) + 1


# ---------------------------------------------------------------------------- children


def _vm_hwm_mib() -> float:
    """This process's peak resident memory (VmHWM, not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device, base_rss):
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "CUDA allocated"}
    return {"peak_mib": _vm_hwm_mib(), "base_mib": base_rss, "kind": "RSS"}


def child(spec: dict) -> dict:
    torch.set_grad_enabled(False)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    sd = torch.load(spec["weights"], map_location="cpu")
    clicks = spec["clicks"]
    if spec["impl"] == "reference":
        from _reference import build_reference

        ref = build_reference(MODEL, seed=SEED, image_size=spec["size"], video=True)
        ref.load_state_dict(sd, strict=True)
        ref.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.data.fill_(spec["bias"])
        ref = ref.to(device).eval()
        _patch_reference_memory_dtype(ref)
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if spec.get("amp") else contextlib.nullcontext()
        if device.type == "cuda":  # CUDA libraries' start-up outside the timing (ours does the same)
            with amp:
                ref.forward_image(torch.zeros(1, 3, spec["size"], spec["size"], device=device))
            _sync(device)
        base = _vm_hwm_mib()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with amp:
            t0 = time.perf_counter()
            state = ref.init_state(spec["jpg"])
            t_init = time.perf_counter() - t0
            for c in clicks:
                ref.add_new_points_or_box(state, c["z"], c["id"], points=[c["xy"]], labels=[1])
            for reverse in (False, True):
                for _f, _ids, _m in ref.propagate_in_video(state, reverse=reverse):
                    pass
            _sync(device)
            seconds = time.perf_counter() - t0
        depth = state["num_frames"]
        return {"seconds": seconds, "init_s": t_init, "slices_per_object": float(depth), **_peak(device, base)}

    from napari_sam2.model import build_model, get_config
    from napari_sam2.model.video import StackSession

    model = build_model(get_config(MODEL).with_image_size(spec["size"]))
    model.load_state_dict(sd, strict=True)
    model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.data.fill_(spec["bias"])
    model = model.to(device).eval()
    frames = np.load(spec["frames"])
    if device.type == "cuda":  # CUDA libraries' start-up outside the timing (the reference's too)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if spec["fast"] else contextlib.nullcontext()
        with amp:
            model.frame_features(model.normalize(torch.zeros(1, 3, spec["size"], spec["size"], device=device)))
        _sync(device)
    base = _vm_hwm_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kw = {} if spec.get("cache_mb") is None else {"feature_cache_mb": spec["cache_mb"]}
    t0 = time.perf_counter()
    sess = StackSession(model, frames, fill_hole_area=0, fast=spec["fast"], **kw)
    for c in clicks:
        sess.add_points(c["z"], c["id"], points=[c["xy"]], labels=[1])
    counts = {c["id"]: 0 for c in clicks}
    if spec.get("pilot"):  # object scores along a whole propagation, by slice
        scores = {}
        for f, ids, _low, sc in sess.propagate_logits("both"):
            for i, s in zip(ids, sc.tolist()):
                scores.setdefault(i, {})[f] = s
        return {"scores": {str(i): {str(f): s for f, s in v.items()} for i, v in scores.items()}}
    for _f, masks in sess.propagate("both", stop_after_absent=spec["stop"]):
        for i in masks:
            counts[i] += 1
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "slices_per_object": float(np.mean(list(counts.values()))), **_peak(device, base)}


def _patch_reference_memory_dtype(ref) -> None:
    """The reference keeps memories in bfloat16 and relies on concatenating them with float32
    object pointers to get float32; on a slice before an object's first prompt (tracked from
    an earlier object's start) there is no pointer yet, and its float32 memory attention fails
    ("mat1 and mat2 must have the same dtype"). Cast the memory to the features' dtype, as the
    concatenation does whenever a pointer exists: same numbers, same cost."""
    ma = ref.memory_attention
    forward = ma.forward

    def patched(curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens=0):
        dt = (curr[0] if isinstance(curr, list) else curr).dtype
        return forward(curr, memory.to(dt), curr_pos, None if memory_pos is None else memory_pos.to(dt), num_obj_ptr_tokens)

    ma.forward = patched


def run_child(spec: dict) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, __file__, "_child", json.dumps(spec)], capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        raise SystemExit(f"child {spec['impl']} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- calibration


def predicted_slices(c, depth: int, by_distance, bias: float, stop: int) -> int:
    """run_sweeps' stop rule applied to pilot scores (by signed distance from the click) + bias."""
    lo, hi = min(by_distance), max(by_distance)

    def score(d):
        return by_distance[min(max(d, lo), hi)] + bias

    n = 0
    for order in (range(c["z"], depth), range(c["z"] - 1, -1, -1)):
        run = 0
        for f in order:
            n += 1
            run = run + 1 if score(f - c["z"]) <= 0 else 0
            if run >= stop:
                break
    return n


def calibrate(raw_by_distance, clicks, depth: int, stop: int):
    """The bias whose predicted mean slices per object is nearest the realistic target:
    (bias, predicted mean, target)."""
    target = float(np.mean([realistic_slices(c, depth, stop) for c in clicks]))
    best = None
    for b in np.round(np.arange(-0.3, 0.3001, 0.0005), 4):
        pred = float(np.mean([predicted_slices(c, depth, raw_by_distance, float(b), stop) for c in clicks]))
        key = (abs(pred - target), abs(b))
        if best is None or key < best[0]:
            best = (key, float(b), pred)
    return best[1], best[2], target


def calibrate_rounds(run_pilot, clicks, depth: int, stop: int, rounds: int):
    """Pilot propagations (the largest object alone, float32, no stop) at bias b_k, each giving
    the next b from its scores shifted by b - b_k. Shifting is exact only while no slice changes
    between present and absent (an absent slice's memory differs), so each round re-runs the
    pilot at its b: there the stop rule applied to the pilot's own scores gives exactly the
    slices a stop run computes for that object. Returns the round nearest the target."""
    b, history = 0.0, []
    target = float(np.mean([realistic_slices(c, depth, stop) for c in clicks]))
    for k in range(rounds):
        scores = run_pilot(b)
        raw = {int(f) - clicks[0]["z"]: v - b for f, v in scores.items()}
        pred_here = float(np.mean([predicted_slices(c, depth, raw, b, stop) for c in clicks]))
        own = predicted_slices(clicks[0], depth, raw, b, stop)
        near = ", ".join(f"{d:+d}: {raw[d] + b:+.3f}" for d in sorted(raw) if abs(d) <= 6)
        history.append((abs(pred_here - target), b, pred_here))
        print(f"calibration round {k + 1}: pilot (object {clicks[0]['id']}, float32, no stop) at bias {b:+.4f}: "
              f"scores by distance from the click {near}; with stop_after_absent={stop} it would compute {own} slices; "
              f"predicted mean over the {len(clicks)} objects {pred_here:.1f} (target {target:.1f})", flush=True)
        if abs(pred_here - target) <= 1.0:
            break
        nb, _pred, _ = calibrate(raw, clicks, depth, stop)
        if nb == b:
            break
        b = nb
    _, b, pred = min(history)
    return b, pred, target


# ---------------------------------------------------------------------------- main


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    s = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        s += f", GPU {torch.cuda.get_device_name(device)}"
    return s


def fmt_time(t, ref=None):
    if t is None:
        return "-"
    return f"{t:.1f}" + ("" if ref is None else f" (x{ref / t:.2f})")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="slice side and model input size (px)")
    ap.add_argument("--slices", type=int, default=40, help="stack depth")
    ap.add_argument("--objects", type=int, nargs="+", default=[1, 5, 20], help="object counts N")
    ap.add_argument("--reference-objects", type=int, nargs="+",
                    help="N for which the reference runs (default: all of --objects); others are extrapolated, labelled")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement (the fastest is kept)")
    ap.add_argument("--stop-after", type=int, default=3, help="stop_after_absent for the early-stop runs (widget default: 3)")
    ap.add_argument("--stop-bias", type=float, help="object-score bias of the early-stop runs (default: calibrated)")
    ap.add_argument("--calibration-rounds", type=int, default=3,
                    help="at most this many pilot propagations (one object, float32) to calibrate b")
    ap.add_argument("--feature-cache-mb", type=float, help="ours' slice-feature cache (default: the engine's)")
    ap.add_argument("--ours", nargs="+", choices=OURS, default=list(OURS),
                    help="which of our configurations run (default: all); 'stop' runs use the calibrated bias b "
                         "(and bias +8 for --positive-stop-objects)")
    ap.add_argument("--positive-stop-objects", type=int, nargs="*",
                    help="N for which early stop also runs with bias +8, where it never triggers and must cost what "
                         "no stop costs (default: the largest N only)")
    ap.add_argument("--threads", type=int, help="torch threads in every run (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="nuclei_3d seed")
    args = ap.parse_args()
    objects = sorted(set(args.objects))
    ref_objects = [] if args.skip_reference else sorted(set(args.reference_objects or objects) & set(objects))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    print(f"machine: {machine(device)}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_many_"))
    image, labels, n_nuclei = make_stack(args.size, args.slices, max(objects), args.seed)
    decoded = write_jpegs(to_uint8(image), tmp / "jpg")
    np.save(tmp / "frames.npy", decoded)
    del image, decoded
    clicks = make_clicks(labels, max(objects))
    extent = np.mean([c["z1"] - c["z0"] + 1 for c in clicks])
    print(f"{MODEL} at {args.size} px, random weights; nuclei_3d(seed={args.seed}): {args.slices} slices, "
          f"{n_nuclei} nuclei; objects: the N largest, each clicked at the central pixel of its largest slice "
          f"(slices {sorted({c['z'] for c in clicks})}); mean true z extent of the {max(objects)} largest: {extent:.1f} slices",
          flush=True)

    # weights: the parity helpers' seeded random reference, copied into ours
    try:
        from _reference import build_reference

        ref = build_reference(MODEL, seed=SEED, image_size=args.size, video=True, object_score_bias=POSITIVE_BIAS)
        sd = ref.state_dict()
        del ref
    except Exception as e:  # no reference installed: ours with the same kind of random weights
        if ref_objects:
            raise SystemExit(f"the reference (sam2==1.1.0) is needed: {e}; or pass --skip-reference")
        from _reference import randomize_

        from napari_sam2.model import build_model, get_config

        torch.manual_seed(SEED)
        m = build_model(get_config(MODEL).with_image_size(args.size))
        randomize_(m, SEED + 1)
        sd = m.state_dict()
        print(f"(reference not available: {type(e).__name__}; ours with seeded random weights)")
    torch.save(sd, tmp / "weights.pt")
    del sd
    common = {"weights": str(tmp / "weights.pt"), "frames": str(tmp / "frames.npy"), "jpg": str(tmp / "jpg"),
              "size": args.size, "device": args.device, "threads": args.threads, "cache_mb": args.feature_cache_mb}

    # the early-stop bias
    if not any(o.endswith("-stop") for o in args.ours):
        stop_bias = float("nan")
    elif args.stop_bias is None:
        def run_pilot(bias):
            out = run_child({**common, "impl": "ours", "fast": False, "bias": bias, "stop": None, "pilot": True,
                             "clicks": clicks[:1]})
            return out["scores"][str(clicks[0]["id"])]

        stop_bias, predicted, target = calibrate_rounds(run_pilot, clicks, args.slices, args.stop_after,
                                                        args.calibration_rounds)
        print(f"calibrated bias b = {stop_bias:+.4f}: predicted {predicted:.1f} slices computed per object "
              f"(of the {max(objects)} largest) for the target {target:.1f} = true z extent + {args.stop_after} "
              f"at each end", flush=True)
    else:
        stop_bias = args.stop_bias
        print(f"early-stop bias b = {stop_bias:+.4f} (given)")

    configs = [  # (column, fast, stop, bias)
        ("f32", False, None, POSITIVE_BIAS),
        ("f32 stop +8", False, args.stop_after, POSITIVE_BIAS),
        ("f32 stop b", False, args.stop_after, stop_bias),
        ("fast", True, None, POSITIVE_BIAS),
        ("fast stop +8", True, args.stop_after, POSITIVE_BIAS),
        ("fast stop b", True, args.stop_after, stop_bias),
    ]
    ref_configs = [("reference", False)] + ([("reference bf16", True)] if device.type == "cuda" else [])

    def measure(spec):
        runs = [run_child(spec) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["seconds"])
        return {**best, "peak_mib": max(r["peak_mib"] for r in runs)}

    results = {}
    for n in objects:
        row = results.setdefault(n, {})
        if n in ref_objects:
            for col, amp in ref_configs:
                row[col] = measure({**common, "impl": "reference", "bias": POSITIVE_BIAS, "amp": amp, "clicks": clicks[:n]})
                print(f"N={n} {col}: {row[col]['seconds']:.1f} s (init_state {row[col]['init_s']:.1f} s), "
                      f"peak {row[col]['peak_mib']:.0f} MiB", flush=True)
        pos_stop = objects[-1:] if args.positive_stop_objects is None else args.positive_stop_objects
        for col, fast, stop, bias in configs:
            if bias == POSITIVE_BIAS and stop is not None and n not in pos_stop:
                continue
            if col.split(" ")[0] + ("-stop" if stop is not None else "") not in args.ours:
                continue
            row[col] = measure({**common, "impl": "ours", "fast": fast, "stop": stop, "bias": bias, "clicks": clicks[:n]})
            print(f"N={n} {col}: {row[col]['seconds']:.1f} s, {row[col]['slices_per_object']:.1f} slices per object, "
                  f"peak {row[col]['peak_mib']:.0f} MiB", flush=True)

    # the reference where it did not run: a straight line through its measured times
    measured = {n: results[n]["reference"]["seconds"] for n in ref_objects}
    ref_time, extrapolated = {}, set()
    for n in objects:
        if n in measured:
            ref_time[n] = measured[n]
        elif len(measured) >= 2:
            a, b = np.polyfit(list(measured), list(measured.values()), 1)[::-1]
            ref_time[n] = a + b * n
            extrapolated.add(n)
        elif len(measured) == 1:
            (n0, t0), = measured.items()
            ref_time[n] = t0 * n / n0
            extrapolated.add(n)

    cols = [c[0] for c in configs if any(c[0] in results[n] for n in objects)]
    heads = {"f32": "ours f32", "f32 stop +8": "ours f32, stop (+8)", "f32 stop b": "ours f32, stop (b)",
             "fast": "ours fast", "fast stop +8": "ours fast, stop (+8)", "fast stop b": "ours fast, stop (b)"}
    mem = "peak CUDA memory allocated" if device.type == "cuda" else "peak RSS"
    print()
    print(f"Whole-stack segmentation, {MODEL} at {args.size} px (random weights), {args.slices} slices, "
          f"{args.device}; seconds (x reference's time / ours)"
          + (f"; stop = stop_after_absent={args.stop_after}, (+8): object-score bias +8 (never stops), "
             f"(b): bias {stop_bias:+.4f}" if any(" stop" in c for c in cols) else ""))
    extra_ref = ["reference bf16"] if device.type == "cuda" and ref_objects else []
    print("| N | reference s | " + " | ".join(e + " s" for e in extra_ref) + (" | " if extra_ref else "")
          + " | ".join(heads[c] + " s" for c in cols) + " |")
    print("| --- " * (2 + len(extra_ref) + len(cols)) + "|")
    for n in objects:
        r = ref_time.get(n)
        rs = "-" if r is None else (f"~{r:.1f} (extrapolated)" if n in extrapolated else f"{r:.1f}")
        cells = [fmt_time(results[n][e]["seconds"], r) if e in results[n] else "-" for e in extra_ref]
        cells += [fmt_time(results[n][c]["seconds"], r) if c in results[n] else "-" for c in cols]
        print(f"| {n} | {rs} | " + " | ".join(cells) + " |")
    print()
    bases = [r["base_mib"] for n in objects for c, r in results[n].items() if c in cols and "base_mib" in r]
    print(f"{mem}, MiB (each run in its own process"
          + (f"; ours' RSS after building the model: {min(bases):.0f} MiB" if bases else "") + ")")
    allc = [c for c, _ in ref_configs if ref_objects] + cols
    print("| N | " + " | ".join(heads.get(c, c) for c in allc) + " |")
    print("| --- " * (1 + len(allc)) + "|")
    for n in objects:
        print(f"| {n} | " + " | ".join(f"{results[n][c]['peak_mib']:.0f}" if c in results[n] else "-" for c in allc) + " |")
    print()
    print(f"slices computed per object (of {args.slices}); realistic target = true z extent + {args.stop_after} "
          f"slices at each end, what a model that stops where the object ends computes")
    print("| N | target | " + " | ".join(heads[c] for c in cols) + " |")
    print("| --- " * (2 + len(cols)) + "|")
    for n in objects:
        tgt = np.mean([realistic_slices(c, args.slices, args.stop_after) for c in clicks[:n]])
        print(f"| {n} | {tgt:.1f} | " + " | ".join(f"{results[n][c]['slices_per_object']:.1f}" if c in results[n] else "-" for c in cols) + " |")
    print()
    if extrapolated:
        print(f"reference times marked ~ are EXTRAPOLATED (not measured) from N = {sorted(measured)} "
              + ("with a straight line through the measured times." if len(measured) >= 2 else "in proportion to N "
                 "(an overestimate: the reference computes each slice's image features once for all objects)."))
    print("With random weights the object score does not depend on the object: with bias +8 nothing ever stops; with "
          "bias b the stop comes at a distance from the click (the score drifts with it), "
          + ("calibrated so that the mean slices computed per object match the target above"
             if args.stop_bias is None else "given on the command line") + ", not where each object ends. With trained weights "
          "(the bundled nano model) the stop comes where the nuclei end: see benchmarks/many_objects_quality.py.")
    print("The reference reads JPEG slices (its init_state, in its time); ours gets the same decoded pixels. "
          "Its memory attention is given memories cast to float32 (see _patch_reference_memory_dtype): without it, "
          "objects clicked after the earliest clicked slice crash it on a CPU.")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
