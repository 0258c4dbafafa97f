"""The benchmark suite of moa_stream: what the middleware adds, side by side in one run.

Six sections, each against the embedded simulator served from a subprocess over loopback HTTP with
zero artificial latency, so that the client's own cost dominates: `chunks` (CPU per streamed chunk:
the HTTP+msgspec floor, the bare SDK, the wrapped client, fast mode, a MoA preset), `sinks` (events and
traces off vs on), `concurrency` (1 to 1,000 concurrent streams and MoA turns: throughput, TTFT, RSS,
lost events), `fanout` (the gap between the quorum rule being met and the aggregator request),
`responses` (the Responses API next to chat) and `calls` (CPU per call and calls/s of short streams
and non-streamed calls). `endpoint` measures any OpenAI-compatible endpoint instead.

Installed as `moa_stream.benchmarks`: run `moa-stream bench [--quick] [--sections ...]` anywhere, or
`python -m benchmarks` in a source checkout. Each section prints a table, writes `<section>.json`
and, with matplotlib installed (the `bench` extra), `<section>.png` to `--out-dir` (default:
`./moa-stream-bench` in the working directory, never the source tree).
"""
