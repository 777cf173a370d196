#!/usr/bin/env python3
"""Smoke check of fusionlog against a real OpenAI-compatible LLM server (for CI and after a server change).

    python bench/smoke.py --llm-url http://127.0.0.1:8080/v1 [--data ../shared/data]

1. three real chat calls (no cache) through distill.ChatClient.answer(distill.build_messages(...)) on
   short real-looking sessions -- one with a labeled example in the prompt, one asking for token
   log-probabilities -- must each parse into a valid label; they are printed;
2. a tiny `fusionlog run` end to end on slices of the shared logs (sources: BGL_2k and 3,000 lines of
   OpenStack that hold both classes; target: the first 3,000 lines of HDFS), with a fresh answer cache and
   --budget 5, must exit 0, write one prediction per target session and answer every question it asked.

About a minute on 2 CPU cores with the local 1.5B model (each call ~2-8 s). Exit 0 when all is well, 1 on a
failed check, 2 when the server or the data is not there; the reason is the last line on stderr.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import distill  # noqa: E402
import fusionlog  # noqa: E402

# Short sessions as the prompts show them: (masked template, count), first-appearance order.
HDFS_NORMAL = [
    ("BLOCK* NameSystem.allocateBlock: <*> <*>", 1),
    ("Receiving block <*> src: <*> dest: <*>", 3),
    ("PacketResponder <*> for block <*> terminating", 3),
    ("Received block <*> of size <*> from <*>", 3),
    ("BLOCK* NameSystem.addStoredBlock: blockMap updated: <*> is added to <*> size <*>", 3),
]
OPENSTACK_FAILED = [
    ("[instance: <*>] Attempting claim: memory <*> MB, disk <*> GB, vcpus <*> CPU", 1),
    ("[instance: <*>] Claim successful", 1),
    ("[instance: <*>] Instance failed to spawn", 1),
    ("[instance: <*>] Terminating instance", 1),
    ("[instance: <*>] Deleting instance files <*>", 1),
]
BGL_KERNEL = [
    ("RAS KERNEL INFO instruction cache parity error corrected", 12),
    ("RAS KERNEL FATAL data TLB error interrupt", 1),
    ("RAS APP FATAL ciod: Error reading message prefix after LOGIN_MESSAGE on CioStream socket to <*>: "
     "Link has been severed", 2),
]
EXAMPLE_NORMAL = [("RAS KERNEL INFO generating core.<*>", 4), ("RAS KERNEL INFO <*> double-hummer alignment "
                                                                   "exceptions", 1)]

OPENSTACK_LINES = (18_500, 21_500)  # the log's faults start at line ~20,000: this slice holds both classes
HDFS_LINES = 3_000


class SmokeFailure(Exception):
    pass


def say(msg: str) -> None:
    print(f"smoke: {msg}", file=sys.stderr, flush=True)


def chat_calls(url: str, model: str, response_format: str, timeout: float) -> None:
    """Three uncached calls; each must come back as a valid answer."""
    cases = [
        ("HDFS block, complete write", HDFS_NORMAL, [], False),
        ("OpenStack instance, spawn failed (with 1 labeled example)", OPENSTACK_FAILED,
         [(EXAMPLE_NORMAL, 0)], False),
        ("BGL window, kernel errors (logprobs)", BGL_KERNEL, [], True),
    ]
    for title, session, examples, logprobs in cases:
        client = distill.ChatClient(base_url=url, model=model, response_format=response_format, cache=None,
                                    logprobs=logprobs, max_retries=1, timeout=timeout)
        t = time.perf_counter()
        try:
            ans = client.answer(distill.build_messages(session, examples))
        except distill.LLMError as e:
            raise SmokeFailure(f"chat call '{title}' failed: {e}") from None
        if ans.label not in (0, 1) or not 0.0 <= ans.confidence <= 1.0:
            raise SmokeFailure(f"chat call '{title}': invalid answer {ans}")
        p = "n/a (server gave no logprobs)" if ans.p_anomalous is None else f"{ans.p_anomalous:.3f}"
        print(f"{title}: {distill.LABEL_NAMES[ans.label]} (confidence {ans.confidence:.2f}"
              + (f", p(anomalous) {p}" if logprobs else "") + f") in {time.perf_counter() - t:.1f}s; "
              f"reason: {ans.reason!r}")


def write_lines(src: Path, dst: Path, start: int, stop: int) -> None:
    with open(src, encoding="utf-8", errors="replace") as f, open(dst, "w", encoding="utf-8") as out:
        out.writelines(itertools.islice(f, start, stop))


def end_to_end(url: str, model: str, response_format: str, data: Path) -> None:
    """`fusionlog run` on small slices, fresh cache, budget 5: exit 0, predictions complete, no failed question."""
    with tempfile.TemporaryDirectory(prefix="fusionlog-smoke-") as tmp:
        tmp = Path(tmp)
        write_lines(data / "OpenStack" / "openstack_nova.log", tmp / "openstack.log", *OPENSTACK_LINES)
        write_lines(data / "HDFS" / "HDFS_2pct.log", tmp / "hdfs.log", 0, HDFS_LINES)
        argv = ["run",
                "--source", f"BGL={data / 'BGL' / 'BGL_2k.log'}",
                "--source", f"OpenStack={tmp / 'openstack.log'}",
                "--labels", f"OpenStack={data / 'OpenStack' / 'anomaly_label.csv'}",
                "--target", f"HDFS={tmp / 'hdfs.log'}",
                "--labels", f"HDFS={data / 'HDFS' / 'anomaly_label.csv'}",
                "--llm-url", url, "--llm-model", model, "--response-format", response_format,
                "--budget", "5", "--cache", str(tmp / "answers.jsonl"),
                "--out", str(tmp / "pred.csv"), "--model-out", str(tmp / "model.npz"),
                "--report", str(tmp / "report.json")]
        say("fusionlog " + " ".join(argv))
        t = time.perf_counter()
        rc = fusionlog.main(argv)
        if rc != 0:
            raise SmokeFailure(f"'fusionlog run' exited {rc}")
        report = json.loads((tmp / "report.json").read_text())
        with open(tmp / "pred.csv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != report["sessions"] or not rows:
            raise SmokeFailure(f"{len(rows)} predictions for {report['sessions']} target sessions")
        if any(r["label"] not in ("Normal", "Anomaly") for r in rows):
            raise SmokeFailure("a prediction row has a label other than Normal/Anomaly")
        failed = sum(r.get("failed", 0) for r in report["rounds"])
        if failed:
            raise SmokeFailure(f"{failed} LLM question(s) in the run got no valid answer "
                               f"(faults: {report['llm_faults']})")
        if report["llm_calls"] > 5:
            raise SmokeFailure(f"the run made {report['llm_calls']} LLM calls with --budget 5")
        print(f"end to end: exit 0 in {time.perf_counter() - t:.1f}s; {report['sessions']} target sessions, "
              f"{report['llm_calls']} LLM calls, faults {report['llm_faults'] or 'none'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm-url", default=fusionlog.DEFAULT_LLM_URL,
                   help="OpenAI-compatible base URL ('fake' = the test suite's fake server, a dry run)")
    p.add_argument("--llm-model", default="local", help="model name sent to the server")
    p.add_argument("--response-format", default="json_object_schema",
                   choices=["json_object_schema", "json_schema", "none"])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared LogHub samples")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for a busy server to answer")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per attempt of each of the 3 chat calls")
    args = p.parse_args(argv)
    data = Path(args.data)
    fake = None
    if args.llm_url == "fake":  # a dry run of this script itself, against the test suite's fake server
        from test_fusionlog import FakeLLM  # needs the test extra (pytest)
        fake = FakeLLM().start()
        args.llm_url = fake.url
    try:
        return run(args, data)
    finally:
        if fake is not None:
            fake.stop()


def run(args, data: Path) -> int:
    missing = [str(data / f) for f in ("BGL/BGL_2k.log", "OpenStack/openstack_nova.log",
                                       "OpenStack/anomaly_label.csv", "HDFS/HDFS_2pct.log",
                                       "HDFS/anomaly_label.csv") if not (data / f).exists()]
    if missing:
        say(f"FAILED: data not found: {', '.join(missing)} (give --data)")
        return 2
    t = time.perf_counter()
    client = distill.ChatClient(base_url=args.llm_url, model=args.llm_model)
    while True:  # llama-cpp-python answers nothing, not even /models, while it generates for another client
        try:
            models = client.check()
            break
        except distill.LLMUnavailable as e:
            if "did not answer" not in str(e) or time.perf_counter() - t > args.wait:
                say(f"FAILED: {e}")
                return 2
            say(f"{e}; busy? waiting up to {args.wait:.0f}s")
    say(f"server {args.llm_url} is up; models: {', '.join(models) or '(not listed)'}")
    try:
        chat_calls(args.llm_url, args.llm_model, args.response_format, args.timeout)
        end_to_end(args.llm_url, args.llm_model, args.response_format, data)
    except SmokeFailure as e:
        say(f"FAILED: {e}")
        return 1
    say(f"OK in {time.perf_counter() - t:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
