"""Runs every benchmark in bench/ in its own subprocess; writes bench/results.json and results.md.

    python -m bench.run_all                 # everything (`make bench`)
    python -m bench.run_all --quick         # smaller settings (scale: 1 and 8 devices, no levers)
    python -m bench.run_all --only scale,bands --timeout 600

A benchmark is any `bench/<name>.py` module other than this one; it is run as
`python -m bench.<name> [args]`. Its stdout is captured, and its last `RESULT {json}` line (the
machine-readable summary every benchmark prints) goes into results.json next to the exit status,
wall time and the tail of its output. A benchmark that fails or times out is recorded as such and
the others still run; the exit status is non-zero if any failed.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
# Extra arguments per benchmark: (full run, --quick run).
ARGS = {
    "scale": ([], ["--sizes", "1,8", "--extra-meshes", "", "--no-levers"]),
    "input": ([], ["--batches", "50"]),
    "bands": ([], ["--runs", "3"]),
    "attention": ([], ["--no-step", "--rounds", "1"]),
    "profile_step": ([], ["--shape", "S:small:2", "--repeats", "1"]),
    "train_step": ([], []),
}
TIMEOUT = {"scale": 4 * 3600.0}  # seconds; others use --timeout
TAIL_LINES = 40


def discover() -> list:
  """Names of the benchmark modules in bench/, sorted."""
  return sorted(f[:-3] for f in os.listdir(BENCH_DIR)
                if f.endswith(".py") and not f.startswith("_") and f != "run_all.py")


def last_result(stdout: str):
  """The JSON of the last `RESULT {json}` line, or None."""
  for line in reversed(stdout.splitlines()):
    if line.startswith("RESULT "):
      try:
        return json.loads(line[len("RESULT "):])
      except json.JSONDecodeError:
        return None
  return None


def run_one(name: str, args: list, timeout: float) -> dict:
  """Runs `python -m bench.<name> args`; status, seconds, parsed RESULT and output tail."""
  cmd = [sys.executable, "-m", f"bench.{name}", *args]
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out, err, code = p.stdout, p.stderr, p.returncode
    status = "ok" if code == 0 else f"exit {code}"
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    status = f"timeout after {timeout:.0f} s"
  seconds = time.perf_counter() - t0
  result = last_result(out)
  if status == "ok" and result is None:
    status = "ok (no RESULT line)"
  return {"name": name, "command": " ".join(cmd[1:]), "status": status,
          "seconds": round(seconds, 1), "result": result,
          "stdout_tail": "\n".join(out.splitlines()[-TAIL_LINES:]),
          "stderr_tail": "" if status.startswith("ok") else "\n".join(err.splitlines()[-TAIL_LINES:])}


def to_markdown(report: dict) -> str:
  """Human-readable summary: one table row per benchmark, then each one's output."""
  lines = [f"# Benchmark results ({report['date']})", "",
           f"Machine: {report['machine']}", "",
           "| benchmark | status | wall s | command |", "|---|---|---|---|"]
  for r in report["benchmarks"]:
    lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | `{r['command']}` |")
  for r in report["benchmarks"]:
    lines += ["", f"## {r['name']}", "", "```", r["stdout_tail"].rstrip(), "```"]
    if r["stderr_tail"]:
      lines += ["", "stderr (tail):", "", "```", r["stderr_tail"].rstrip(), "```"]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  """Runs the selected benchmarks and writes the two result files."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="", help="comma-separated benchmark names")
  p.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
  p.add_argument("--quick", action="store_true", help="smaller settings where a benchmark has them")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
  p.add_argument("--out", default=BENCH_DIR, help="directory for results.json / results.md")
  args = p.parse_args(argv)
  names = discover()
  if args.only:
    wanted = args.only.split(",")
    unknown = sorted(set(wanted) - set(names))
    if unknown:
      p.error(f"unknown benchmarks {unknown}; have {names}")
    names = [n for n in names if n in wanted]
  names = [n for n in names if n not in args.skip.split(",")]
  report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
                       f"Python {platform.python_version()}",
            "quick": args.quick, "benchmarks": []}
  for name in names:
    extra = ARGS.get(name, ([], []))[1 if args.quick else 0]
    print(f"[run_all] {name} {' '.join(extra)}", flush=True)
    r = run_one(name, extra, TIMEOUT.get(name, args.timeout))
    print(f"[run_all] {name}: {r['status']} in {r['seconds']:.0f} s", flush=True)
    report["benchmarks"].append(r)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(to_markdown(report))
  print(f"[run_all] wrote {args.out}/results.json and results.md", flush=True)
  return 0 if all(r["status"].startswith("ok") for r in report["benchmarks"]) else 1


if __name__ == "__main__":
  sys.exit(main())
