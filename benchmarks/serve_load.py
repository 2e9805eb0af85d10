"""Load on a running `lmkit serve`: N clients stream completions back to back for S seconds; one JSON line per
client count with requests/s, aggregate tokens/s, time to first token and inter-token latency (p50/p99, ms),
errors, and the server's RSS (from /health) before and after.

    python benchmarks/serve_load.py http://127.0.0.1:8000 --clients 1,4,8,16 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

import httpx


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_request(client: httpx.Client, url: str, body: dict, out: dict) -> None:
    t0 = time.perf_counter()
    last, first = None, None
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            out["errors"].append(r.status_code)
            return
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["errors"].append(chunk["error"].get("code") or "error")
                return
            if chunk.get("usage"):
                out["tokens"] += chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if first is None:
                    first = now
                    out["ttft"].append(now - t0)
                else:
                    out["itl"].append(now - last)
                last = now
    out["requests"] += 1


def transport() -> httpx.HTTPTransport:
    # without TCP_NODELAY, httpx's separate header and body writes meet delayed ACKs: ~40 ms per request
    return httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


def health(client: httpx.Client, url: str) -> dict:
    return client.get(url + "/health").json()


def run(url: str, clients: int, seconds: float, body: dict, headers: dict) -> dict:
    stats = {"requests": 0, "tokens": 0, "ttft": [], "itl": [], "errors": []}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop():
        mine = {"requests": 0, "tokens": 0, "ttft": [], "itl": [], "errors": []}
        with httpx.Client(headers=headers, timeout=120, transport=transport()) as c:
            while time.monotonic() < stop_at:
                try:
                    one_request(c, url, body, mine)
                except httpx.HTTPError as e:
                    mine["errors"].append(type(e).__name__)
        with lock:
            for k in ("requests", "tokens"):
                stats[k] += mine[k]
            for k in ("ttft", "itl", "errors"):
                stats[k] += mine[k]

    with httpx.Client(headers=headers, timeout=30) as c:
        before = health(c, url)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = health(c, url)

    def ms(v):
        return round(v * 1000, 2) if v is not None else None

    return {"clients": clients, "seconds": round(wall, 2), "requests": stats["requests"],
            "requests_per_s": round(stats["requests"] / wall, 2), "tokens_per_s": round(stats["tokens"] / wall, 1),
            "ttft_ms_p50": ms(percentile(stats["ttft"], 0.5)), "ttft_ms_p99": ms(percentile(stats["ttft"], 0.99)),
            "itl_ms_p50": ms(percentile(stats["itl"], 0.5)), "itl_ms_p99": ms(percentile(stats["itl"], 0.99)),
            "itl_ms_mean": ms(statistics.fmean(stats["itl"])) if stats["itl"] else None,
            "errors": len(stats["errors"]), "error_kinds": sorted(set(map(str, stats["errors"]))),
            "rss_mb_before": round((before.get("rss_bytes") or 0) / 2**20, 1),
            "rss_mb_after": round((after.get("rss_bytes") or 0) / 2**20, 1),
            "model": before.get("model"), "requests_served": after.get("requests_served")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--clients", default="1,4,8,16", help="comma-separated client counts, run one after another")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds per client count")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args()
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    for n in (int(x) for x in args.clients.split(",")):
        print(json.dumps(run(url, n, args.seconds, body, headers)), flush=True)


if __name__ == "__main__":
    main()
