-- `mailbus rewind projector` empties a namespace's projection so the projector
-- can build it again from the topics. The CLI's role may delete those rows
-- (and must read them to select by namespace), nothing more: the projector
-- alone writes them.
GRANT SELECT, DELETE ON message_events, message_status, daily_counts, suppressions
    TO mailbus_admin;
