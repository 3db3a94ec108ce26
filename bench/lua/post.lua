-- wrk script for bench/run.py: POST fixed multipart bodies built (and written to files) by it.
--
--   BENCH_BODY=/tmp/body.bin BENCH_CONTENT_TYPE='multipart/form-data; boundary=...' \
--     wrk -t2 -c16 -d5s --latency -s bench/lua/post.lua http://127.0.0.1:PORT/api/v2/
--
-- BENCH_BODY: one body, sent as is by every request (wrk formats it once: no Lua per request).
-- BENCH_BODY_LIST instead: a file naming one body file per line; requests cycle through them
-- (all bodies must share BENCH_CONTENT_TYPE, i.e. the boundary).
local content_type = assert(os.getenv("BENCH_CONTENT_TYPE"), "BENCH_CONTENT_TYPE is not set")
wrk.method = "POST"
wrk.headers["Content-Type"] = content_type

local function slurp(path)
  local file = assert(io.open(path, "rb"))
  local data = file:read("*a")
  file:close()
  return data
end

local list = os.getenv("BENCH_BODY_LIST")
if list then
  local bodies = {}
  for line in io.lines(list) do
    if line ~= "" then bodies[#bodies + 1] = slurp(line) end
  end
  assert(#bodies > 0, "BENCH_BODY_LIST names no body")
  local requests, i = {}, 0

  function init(args)
    -- wrk.headers["Host"] is set by now; one preformatted request per body.
    for k, body in ipairs(bodies) do requests[k] = wrk.format(nil, nil, nil, body) end
    i = math.random(#requests) - 1
  end

  function request()
    i = i % #requests + 1
    return requests[i]
  end
else
  wrk.body = slurp(assert(os.getenv("BENCH_BODY"), "BENCH_BODY or BENCH_BODY_LIST must be set"))
end

-- One machine-readable line at the end; bench/run.py parses it and wrk's text report.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-DONE requests=%d duration_us=%d status_errors=%d connect=%d read=%d write=%d " ..
    "timeout=%d p50_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
