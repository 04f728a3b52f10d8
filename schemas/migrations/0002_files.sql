-- Files pull area: what HQ did with each file event (see docs/hq-puller.md, "Files").
--   state = 'stored'     the content is at files_dir/<location>/<path> (sha256, size)
--           'superseded' the branch no longer had that content when HQ asked for it; a
--                        later event for the path follows in the stream
--           'deleted'    the file was deleted at the branch (mirrored or archived)
ALTER TABLE sync.files ADD COLUMN state text NOT NULL DEFAULT 'stored';
ALTER TABLE sync.files ADD COLUMN archived_as text;
ALTER TABLE sync.files ADD CONSTRAINT files_state_check
    CHECK (state IN ('stored', 'superseded', 'deleted'));
-- The _live views of tables with a file_column look files up by (location, path).
