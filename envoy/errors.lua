-- Gives HTTP callers OpenAI's error shape for errors that services return as
-- gRPC statuses. Envoy's transcoder (convert_grpc_status) turns such a status
-- into {"code": N, "message": "...", "details": [...]}; our services put the
-- exact OpenAI body in the message, so this filter unwraps it. Anything else
-- (a status from a library, not from us) is wrapped in the same shape.
-- Successful responses return at the first line: this costs nothing on 200s.
-- HTTP/1.0 requests are refused here with a 426 that the local reply config
-- puts in OpenAI's shape (Envoy's own refusal is a bare text 426).

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

-- common.errors.ECHO_CHARS_MAX: Envoy's own replies quote the transcoder's message
-- about a body (which repeats a bad field's value whole); messages longer than
-- this many characters are cut.
local ECHO_CHARS_MAX = 256
-- A reply of Envoy's (local_reply_config's json_format sorts keys) this long
-- may carry a long message; shorter ones are left alone unread.
local LOCAL_REPLY = '{"error":{"code":'
local LOCAL_REPLY_BYTES_SHORT = 512

local function cut(s, n)
  local count = 0
  for i = 1, #s do
    local b = s:byte(i)
    if b < 0x80 or b >= 0xC0 then -- the first byte of a UTF-8 character
      count = count + 1
      if count > n then return s:sub(1, i - 1) .. "..." end
    end
  end
  return s
end

-- The same reply with its message cut to ECHO_CHARS_MAX characters, or nil. Inside a
-- JSON string every '"' is escaped, so the first '","param":' ends the message.
local function shortened(text)
  local _, open = text:find('"message":"', 1, true)
  if open == nil then return nil end
  local close = text:find('","param":', open + 1, true)
  if close == nil then return nil end
  local message = unescape(text:sub(open + 1, close - 1))
  if #message <= ECHO_CHARS_MAX then return nil end
  return text:sub(1, open) .. escape(cut(message, ECHO_CHARS_MAX)) .. text:sub(close)
end

local function replace_body(handle, body, out)
  body:setBytes(out)
  -- Waiting for the body invalidated the first headers handle: take it again.
  local headers = handle:headers()
  headers:replace("content-length", tostring(#out))
  return headers
end

function envoy_on_request(handle)
  if handle:streamInfo():protocol() == "HTTP/1.0" then
    handle:respond({[":status"] = "426", ["connection"] = "close"}, "")
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get(":status")
  if status == "200" then return end
  local ctype = headers:get("content-type") or ""
  if ctype:sub(1, 16) ~= "application/json" then return end
  local body = handle:body()
  if body == nil then return end
  local length = body:length()
  if length > LOCAL_REPLY_BYTES_SHORT and body:getBytes(0, #LOCAL_REPLY) == LOCAL_REPLY then
    local out = shortened(body:getBytes(0, length))
    if out ~= nil then replace_body(handle, body, out) end
    return
  end
  local text = body:getBytes(0, length)
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
  headers = replace_body(handle, body, out)
  headers:remove("grpc-status")
  headers:remove("grpc-message")
end
