-- Dead letters, found without reading the whole queue: for the queue metrics,
-- which count them every few seconds, and for RedriveDeadLetters. Only dead
-- letters have entries, so deliveries in the normal course cost nothing more.
CREATE INDEX deliveries_dead_letter ON deliveries (subscription_id) WHERE status = 'dead_letter';
