-- wrk script: a constant request rate, latency corrected for coordinated omission.
--
-- Debian's wrk (4.1) is closed-loop: each connection sends its next request as soon as the
-- previous answer arrives, so a slow server is sent less and its stall hides from the
-- percentiles ("coordinated omission"). This script gives wrk wrk2's open schedule:
-- request n of the whole run is due at t0 + n / RATE (thread i of T sends n = k*T + i),
-- delay() holds each connection until its next slot, and latency is measured from the
-- slot, not from the send: a request that waits behind a slow one is charged the wait.
-- One connection per thread (wrk -t N -c N), so requests and answers alternate strictly.
--
-- Configured by environment (wrk hands script arguments to the threads only):
--   REV_WRK_RATE     total requests per second across all threads
--   REV_WRK_THREADS  the -t given to wrk
--   REV_WRK_MODE     "jobs": POST /v1/jobs and GET /v1/jobs/<id> alternately, GETs of
--                    real ids (REV_WRK_IDS, then the ids the POSTs return);
--                    anything else: GET of the URL's path, no authentication
--   REV_WRK_TOKEN    the API key (Authorization: Bearer)
--   REV_WRK_BODY     file holding the POST body (JSON)
--   REV_WRK_IDS      file of job ids, one a line
--   REV_WRK_OUT      where done() writes one line per answer: kind status latency_us
--   REV_WRK_WARMUP   seconds from the start whose answers are not written (default 0)

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } rev_timespec;
int clock_gettime(int clk_id, rev_timespec *tp);
]])
local CLOCK_MONOTONIC = 1
local ts = ffi.new("rev_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local function read_file(path)
  local fh = assert(io.open(path, "rb"))
  local data = fh:read("*a")
  fh:close()
  return data
end

local RATE = assert(tonumber(os.getenv("REV_WRK_RATE")), "REV_WRK_RATE")
local THREADS = assert(tonumber(os.getenv("REV_WRK_THREADS")), "REV_WRK_THREADS")
local MODE = os.getenv("REV_WRK_MODE") or "path"
local WARMUP_US = (tonumber(os.getenv("REV_WRK_WARMUP")) or 0) * 1e6

-- ---------------------------------------------------------------- main state: setup, done
local threads = {}
local start_at = nil

function setup(thread)
  -- every thread shares one t0 (CLOCK_MONOTONIC is system-wide), a little in the future
  start_at = start_at or (now_us() + 100e3)
  thread:set("tid", #threads)
  thread:set("t0", start_at)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local out = assert(io.open(assert(os.getenv("REV_WRK_OUT"), "REV_WRK_OUT"), "w"))
  local e = summary.errors
  out:write(string.format(
    "summary duration_us=%d requests=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
  -- wrk's own figures, measured from the send (not corrected): for comparison only
  out:write(string.format("wrk_uncorrected_us p50=%d p99=%d max=%d\n",
    latency:percentile(50), latency:percentile(99), latency.max))
  for _, thread in ipairs(threads) do
    local kinds, codes, lats = thread:get("kinds"), thread:get("codes"), thread:get("lats")
    for i = 1, #lats do
      out:write(kinds[i], " ", codes[i], " ", string.format("%.0f", lats[i]), "\n")
    end
    out:write(string.format("thread lost=%d late_max_us=%.0f\n",
      thread:get("lost"), thread:get("late_max")))
  end
  out:close()
end

-- ---------------------------------------------------------------- thread state
local n, slot, due, pending = 0, 0, nil, nil
local kinds, codes, lats = {}, {}, {}
local ids = {}
lost, late_max = 0, 0
local body, auth

function init(args)
  n = tid
  if MODE == "jobs" then
    body = read_file(assert(os.getenv("REV_WRK_BODY"), "REV_WRK_BODY"))
    for line in read_file(assert(os.getenv("REV_WRK_IDS"), "REV_WRK_IDS")):gmatch("[^\n]+") do
      table.insert(ids, line)
    end
    assert(#ids > 0, "REV_WRK_IDS holds no job id")
    auth = "Bearer " .. assert(os.getenv("REV_WRK_TOKEN"), "REV_WRK_TOKEN")
  end
  math.randomseed(1000 + tid)
  -- the tables done() reads through thread:get
  _G.kinds, _G.codes, _G.lats = kinds, codes, lats
end

function delay()
  slot = n
  due = t0 + slot * 1e6 / RATE
  n = n + THREADS
  local wait = due - now_us()
  if wait <= 0 then
    return 0
  end
  return math.ceil(wait / 1e3)
end

function request()
  if due == nil then
    -- wrk calls request() once at start to check it: a valid request, no state touched
    return wrk.format("GET", wrk.path)
  end
  if pending ~= nil then
    -- wrk re-sends after a broken connection without asking delay(): same slot, one lost
    lost = lost + 1
  end
  local late = now_us() - due
  if late > late_max then
    late_max = late
  end
  if MODE ~= "jobs" then
    pending = "H"
    return wrk.format("GET", wrk.path)
  end
  -- thread i's k-th request: POST when k + i is even, so the global sequence alternates
  if ((slot - tid) / THREADS + tid) % 2 == 0 then
    pending = "P"
    return wrk.format("POST", "/v1/jobs", {
      ["Authorization"] = auth,
      ["Content-Type"] = "application/json",
    }, body)
  end
  pending = "G"
  return wrk.format("GET", "/v1/jobs/" .. ids[math.random(#ids)], {
    ["Authorization"] = auth,
  })
end

function response(status, headers, resp_body)
  local t = now_us()
  if t - t0 >= WARMUP_US then
    table.insert(kinds, pending)
    table.insert(codes, status)
    table.insert(lats, t - due)
  end
  if pending == "P" and status == 202 then
    local id = resp_body:match('"id"%s*:%s*"([0-9a-f-]+)"')
    if id then
      table.insert(ids, id)
    end
  end
  pending = nil
end
