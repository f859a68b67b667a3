-- Usage by modality, for the endpoints that report it (Realtime, Chat Completions with
-- audio, the Images API, the gpt-4o transcription models). Each is a part of its total:
-- audio and image input tokens are part of input_tokens, their cached parts part of
-- cached_input_tokens, audio and image output tokens part of output_tokens.
ALTER TABLE usage_events ADD COLUMN input_audio_tokens BIGINT;
ALTER TABLE usage_events ADD COLUMN cached_audio_tokens BIGINT;
ALTER TABLE usage_events ADD COLUMN output_audio_tokens BIGINT;
ALTER TABLE usage_events ADD COLUMN input_image_tokens BIGINT;
ALTER TABLE usage_events ADD COLUMN cached_image_tokens BIGINT;
ALTER TABLE usage_events ADD COLUMN output_image_tokens BIGINT;
-- Units that are not tokens: seconds of audio transcribed (whisper-1 reports them; kept
-- as integer milliseconds) and characters of text spoken (tts-1 is priced by them).
ALTER TABLE usage_events ADD COLUMN audio_ms BIGINT;
ALTER TABLE usage_events ADD COLUMN input_characters BIGINT;
-- A billable answer that reported no usage (a transcription asked for as plain text, a
-- translation, a dall-e image, speech from a token-priced model): counted, never priced
-- at 0; OpenAI's own usage export (reconciliation) says what it cost.
ALTER TABLE usage_events ADD COLUMN usage_unreported BOOLEAN DEFAULT false;

-- Their prices: USD per 1M audio tokens (input, cached input, output), per hour of
-- audio transcribed, per 1M characters spoken.
ALTER TABLE prices ADD COLUMN audio_input_per_mtok DECIMAL(18, 6);
ALTER TABLE prices ADD COLUMN audio_cached_input_per_mtok DECIMAL(18, 6);
ALTER TABLE prices ADD COLUMN audio_output_per_mtok DECIMAL(18, 6);
ALTER TABLE prices ADD COLUMN audio_per_hour DECIMAL(18, 6);
ALTER TABLE prices ADD COLUMN input_per_mchar DECIMAL(18, 6);

-- The rollup job keeps what it counted of pending events with every count it prices.
ALTER TABLE rollup_pending ADD COLUMN input_audio_tokens BIGINT;
ALTER TABLE rollup_pending ADD COLUMN cached_audio_tokens BIGINT;
ALTER TABLE rollup_pending ADD COLUMN output_audio_tokens BIGINT;
ALTER TABLE rollup_pending ADD COLUMN input_image_tokens BIGINT;
ALTER TABLE rollup_pending ADD COLUMN cached_image_tokens BIGINT;
ALTER TABLE rollup_pending ADD COLUMN output_image_tokens BIGINT;
ALTER TABLE rollup_pending ADD COLUMN audio_ms BIGINT;
ALTER TABLE rollup_pending ADD COLUMN input_characters BIGINT;
ALTER TABLE rollup_pending ADD COLUMN usage_unreported BOOLEAN;
