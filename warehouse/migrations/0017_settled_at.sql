-- When a response's outcome was recorded, for those whose outcome came later (a
-- background response, a stream journaled at its start): the recorded_at of the update
-- that settled it. NULL for a response recorded whole at once (its recorded_at). Shared
-- quota counters (warehouse/quota_shared.py) split each event between the lake's count
-- and the live one by this moment, the same moment the live count sees.
ALTER TABLE usage_events ADD COLUMN settled_at TIMESTAMPTZ;
