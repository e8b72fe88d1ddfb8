-- Who published each event (issue 20): deliveries and streams carry it, and
-- webhooks sign it. Events published before it was recorded have none ('').
ALTER TABLE events ADD COLUMN publisher text NOT NULL DEFAULT '';
