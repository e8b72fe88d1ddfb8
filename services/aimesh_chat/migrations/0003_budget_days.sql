-- Each principal's tokens per UTC day as one row, kept by a trigger on
-- token_usage: the budget check before every answer reads one row instead of
-- summing the day's usage (which grows with every answer), and a replica still
-- on the old code keeps the count right during a rollout.
CREATE TABLE token_budget_days (
    owner_id text NOT NULL,
    day date NOT NULL,
    used_tokens bigint NOT NULL,
    PRIMARY KEY (owner_id, day)
);

INSERT INTO token_budget_days (owner_id, day, used_tokens)
SELECT owner_id, day, sum(input_tokens + output_tokens)
FROM token_usage
GROUP BY owner_id, day;

CREATE FUNCTION count_budget_day() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The row lock taken here is held to commit: concurrent answers of one
    -- principal queue on it, so exactly one of them sees its usage cross the budget.
    INSERT INTO token_budget_days AS d (owner_id, day, used_tokens)
    VALUES (NEW.owner_id, NEW.day, NEW.input_tokens + NEW.output_tokens)
    ON CONFLICT (owner_id, day)
    DO UPDATE SET used_tokens = d.used_tokens + excluded.used_tokens;
    RETURN NULL;
END
$$;

CREATE TRIGGER token_usage_counts_budget_day
AFTER INSERT ON token_usage
FOR EACH ROW EXECUTE FUNCTION count_budget_day();
