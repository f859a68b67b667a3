-- The body's end user when the X-Tokentill-User header named another (the header wins
-- for quotas and reports; both are kept), and the fields cut to their storage bounds.
ALTER TABLE usage_events ADD COLUMN body_user_id VARCHAR;
ALTER TABLE usage_events ADD COLUMN truncated_fields VARCHAR;
