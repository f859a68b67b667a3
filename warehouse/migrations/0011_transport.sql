-- How the response travelled: 'http' (a request, streamed or not) or 'websocket' (the
-- Responses API's WebSocket mode, one socket carrying many responses).
ALTER TABLE usage_events ADD COLUMN transport VARCHAR DEFAULT 'http';
