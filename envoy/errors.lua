-- Gives HTTP callers OpenAI's error shape for errors that services return as
-- gRPC statuses. Envoy's transcoder (convert_grpc_status) turns such a status
-- into {"code": N, "message": "...", "details": [...]}; our services put the
-- exact OpenAI body in the message, so this filter unwraps it. Anything else
-- (a status from a library, not from us) is wrapped in the same shape.
-- Successful responses return at the first line: this costs nothing on 200s.

local function unescape(s)
  s = s:gsub("\\u(%x%x%x%x)", function(hex)
    local c = tonumber(hex, 16)
    if c < 0x80 then return string.char(c) end
    if c < 0x800 then return string.char(0xC0 + math.floor(c / 0x40), 0x80 + c % 0x40) end
    return string.char(0xE0 + math.floor(c / 0x1000), 0x80 + math.floor(c / 0x40) % 0x40, 0x80 + c % 0x40)
  end)
  local map = { ['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t' }
  return (s:gsub('\\(["\\/bfnrt])', map))
end

local function escape(s)
  return (s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == '\\' then return '\\\\' end
    return string.format('\\u%04x', string.byte(c))
  end))
end

local TYPES = { ["429"] = "requests", ["500"] = "server_error", ["503"] = "server_error", ["504"] = "server_error" }

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get(":status")
  if status == "200" then return end
  local ctype = headers:get("content-type") or ""
  if ctype:sub(1, 16) ~= "application/json" then return end
  local body = handle:body()
  if body == nil then return end
  local text = body:getBytes(0, body:length())
  if text:sub(1, 8) ~= '{"code":' then return end
  -- The transcoder always prints "details" after "message" (an empty list when none).
  local message = text:match('"message":"(.*)","details":')
  if message == nil then return end
  message = unescape(message)
  local out
  if message:sub(1, 10) == '{"error": ' or message:sub(1, 9) == '{"error":' then
    out = message
  else
    out = '{"error": {"message": "' .. escape(message) .. '", "type": "' .. (TYPES[status] or "invalid_request_error")
      .. '", "param": null, "code": null}}'
  end
  body:setBytes(out)
  -- Waiting for the body invalidated the first headers handle: take it again.
  headers = handle:headers()
  headers:replace("content-length", tostring(#out))
  headers:remove("grpc-status")
  headers:remove("grpc-message")
end
