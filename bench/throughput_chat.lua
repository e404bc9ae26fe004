-- wrk script for `gateway bench throughput`: every request POSTs one small chat completion.
-- BENCH_KEY (optional) becomes the bearer token, BENCH_STREAM=1 asks for a streamed answer,
-- BENCH_MODEL names the model. When wrk is done, one `BENCH_RESULT {json}` line is printed.
local key = os.getenv("BENCH_KEY")
local stream = os.getenv("BENCH_STREAM") == "1"
local model = os.getenv("BENCH_MODEL") or "bench-model"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Say hi."}],'
  .. '"max_tokens":4,"stream":' .. (stream and "true" or "false") .. '}'

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%.0f,"duration_us":%.0f,"connect_errors":%.0f,"read_errors":%.0f,'
      .. '"write_errors":%.0f,"status_errors":%.0f,"timeouts":%.0f,"p50_us":%.0f,"p90_us":%.0f,'
      .. '"p99_us":%.0f,"max_us":%.0f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
