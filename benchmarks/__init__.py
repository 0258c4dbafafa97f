"""The benchmark suite of moa_stream (issue 4): what the middleware adds, side by side in one run.

Four sections, each against the embedded simulator served from a subprocess over loopback HTTP with
zero artificial latency, so that the client's own cost dominates: `chunks` (CPU per streamed chunk:
the HTTP+msgspec floor, the bare SDK, the wrapped client, fast mode, a MoA preset), `sinks` (events and
traces off vs on), `concurrency` (1 to 1,000 concurrent streams and MoA turns: throughput, TTFT, RSS,
lost events) and `fanout` (the gap between the quorum rule being met and the aggregator request).

Run `moa-stream bench [--quick] [--sections ...]` or `python -m benchmarks` from a source checkout.
Each section prints a table, writes `benchmarks/results/<section>.json` and, with matplotlib
installed (the `bench` extra), `benchmarks/results/<section>.png`.
"""
