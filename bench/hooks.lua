-- wrk script: $BENCH_METHOD (GET or POST, empty body) on the paths listed in
-- $BENCH_PATHS_FILE in turn, counting answers outside 2xx, then print one
-- machine-readable line for bench/hooks_throughput.py.
local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS_FILE")) do
  paths[#paths + 1] = line
end
local method = os.getenv("BENCH_METHOD") or "GET"
local body = method == "POST" and "" or nil -- sends Content-Length: 0
local threads = {}
local i = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  non2xx = 0
end

function request()
  i = i % #paths + 1
  return wrk.format(method, paths[i], nil, body)
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

done = function(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non2xx")
  end
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), bad, summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout))
end
