#!/usr/bin/env python3
"""Where the CPU went while `triage bench` ran: samples of `perf script -F comm,tid,time,ip,sym,dso`
(every process on the machine, with call stacks) classified by process and by the frames on
their stack, per stage. Stages are found as the busy stretches (under 30% idle, at least 3 s)
in order: a (the ceiling), b (the whole worker), c (batch size 1). Used by scripts/profile-worker.

    python3 benches/profiles/account.py perf.txt [--window START END]   (seconds from the first sample)
"""
import collections
import re
import sys

CATEGORIES = [  # (name, substrings of a frame); the first category any frame matches wins
    ("idle", ["pv_native_safe_halt", "cpuidle", "do_idle"]),
    ("inference (ONNX Runtime)", ["libonnxruntime"]),
    ("tokenization", ["tokenizers::", "unicode_normalization", "encode_rendered"]),
    ("Kafka (librdkafka, mock cluster)", ["rd_kafka", "librdkafka"]),
    ("JSON decode, message parsing", ["serde_json", "triage::message::"]),
    ("ClickHouse client (RowBinary, HTTP)", ["clickhouse::", "hyper::", "triage::sink::clickhouse"]),
    ("allocation", ["malloc", "cfree", "realloc", "_int_free", "_int_malloc"]),
    ("tokio, channels, thread wake-ups", ["tokio::", "crossbeam", "futex", "std::sync::", "parking_lot"]),
]


def read(path):
    samples, current = [], None
    for line in open(path, errors="replace"):
        if not line.strip():
            if current:
                samples.append(current)
            current = None
        elif not line[0].isspace():
            m = re.match(r"(.+?)\s+(\d+)\s+([\d.]+):", line)
            current = (float(m.group(3)), m.group(1).strip(), []) if m else None
        elif current is not None:
            current[2].append(line.strip())
    if current:
        samples.append(current)
    return samples


def category(comm, frames):
    if comm.lower().startswith("clickhouse") or comm in ("BackgrProcPool", "HTTPHandler", "TCPHandler") or any("libclickhouse" in f for f in frames):
        return "ClickHouse server"
    if comm.startswith("rdk:"):
        return "Kafka (librdkafka, mock cluster)"
    for name, keys in CATEGORIES:
        if any(k in f for f in frames for k in keys):
            return name
    return "idle" if comm == "swapper" else "other (heads, copies, batch assembly, kernel)"


def stages(samples, t0):
    per_second = collections.defaultdict(collections.Counter)
    for t, comm, frames in samples:
        per_second[int(t - t0)][category(comm, frames) == "idle"] += 1
    busy = [s for s in sorted(per_second) if per_second[s][True] < 0.3 * sum(per_second[s].values())]
    runs, start = [], None
    for s in busy:
        if start is None or s != prev + 1:
            if start is not None:
                runs.append((start, prev + 1))
            start = s
        prev = s
    if start is not None:
        runs.append((start, prev + 1))
    return [r for r in runs if r[1] - r[0] >= 3]


def report(samples, t0, start, end, label):
    window = [s for s in samples if start <= s[0] - t0 < end]
    counts = collections.Counter(category(c, f) for _, c, f in window)
    total = max(sum(counts.values()), 1)
    print(f"{label} ({start:.0f}-{end:.0f} s, {total} samples)")
    for name, n in counts.most_common():
        print(f"  {name:48s} {100 * n / total:5.1f}%")
    return counts


def main():
    samples = read(sys.argv[1])
    if not samples:
        sys.exit("no samples")
    t0 = min(s[0] for s in samples)
    if "--window" in sys.argv:
        i = sys.argv.index("--window")
        report(samples, t0, float(sys.argv[i + 1]), float(sys.argv[i + 2]), "window")
        return
    found = stages(samples, t0)
    for label, (start, end) in zip(["a. ceiling", "b. worker", "c. batch size 1"], found):
        report(samples, t0, start, end, label)
        print(f"  window for perf script --time: {t0 + start:.3f},{t0 + end:.3f}")


if __name__ == "__main__":
    main()
