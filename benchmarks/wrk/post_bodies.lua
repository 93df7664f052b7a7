-- wrk script for benchmarks/serve_bench.py: POST a rotating set of prepared inference bodies.
--
-- WRK_BODY_DIR holds 1.body, 2.body, ... (one request body each). A body with a matching N.hlen file
-- uses the binary tensor data extension: N.hlen holds the length of its JSON header, sent as
-- Inference-Header-Content-Length. Requests are formatted once here, so the load generator does no
-- per-request work beyond picking the next one.

local dir = os.getenv("WRK_BODY_DIR")
if not dir then
  error("set WRK_BODY_DIR to a folder of N.body files")
end

local function slurp(path)
  local file = io.open(path, "rb")
  if not file then
    return nil
  end
  local data = file:read("*a")
  file:close()
  return data
end

local requests = {}
local index = 1
while true do
  local body = slurp(dir .. "/" .. index .. ".body")
  if not body then
    break
  end
  local headers = { ["Content-Type"] = "application/json" }
  local header_length = slurp(dir .. "/" .. index .. ".hlen")
  if header_length then
    headers["Content-Type"] = "application/octet-stream"
    headers["Inference-Header-Content-Length"] = header_length
  end
  requests[#requests + 1] = wrk.format("POST", nil, headers, body)
  index = index + 1
end
if #requests == 0 then
  error("no N.body files in " .. dir)
end

local next_request = 0

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end
