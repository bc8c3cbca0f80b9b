//! The agent database's schema: embedded migrations, applied in order at open. Each
//! entry is one schema version; never edit one that has shipped, add the next.

/// Schema versions, applied in order; the index + 1 is the `user_version` they lead to.
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tenants (
    name TEXT PRIMARY KEY,
    created_unix_ms INTEGER NOT NULL
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    tenant TEXT REFERENCES tenants(name) ON DELETE CASCADE,
    admin INTEGER NOT NULL,
    description TEXT,
    created_unix_ms INTEGER NOT NULL,
    CHECK (admin = 1 OR tenant IS NOT NULL)
);
CREATE TABLE module_blobs (
    id TEXT PRIMARY KEY,
    bytes BLOB NOT NULL
);
CREATE TABLE modules (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    id TEXT NOT NULL REFERENCES module_blobs(id),
    info TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, id),
    UNIQUE (tenant, name, version)
);
CREATE TABLE kv (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE workflow_versions (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, name, version)
) WITHOUT ROWID;
CREATE TABLE workflows (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
) WITHOUT ROWID;
CREATE TABLE v1_workflows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    workflow TEXT NOT NULL
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    received_unix_ms INTEGER NOT NULL,
    UNIQUE (tenant, id)
);
CREATE TABLE runs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    workflow TEXT NOT NULL,
    workflow_version INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    event_seq INTEGER REFERENCES events(seq),
    event_id TEXT,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    traceparent TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    depth INTEGER NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    started_unix_ms INTEGER,
    finished_unix_ms INTEGER,
    UNIQUE (event_seq, workflow)
);
CREATE INDEX runs_by_tenant ON runs (tenant, seq);
CREATE INDEX runs_open ON runs (status) WHERE status IN ('queued', 'running');
CREATE TABLE run_steps (
    run_seq INTEGER NOT NULL REFERENCES runs(seq) ON DELETE CASCADE,
    step TEXT NOT NULL,
    position INTEGER NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (run_seq, step)
) WITHOUT ROWID;
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    run_seq INTEGER NOT NULL UNIQUE REFERENCES runs(seq) ON DELETE CASCADE,
    error TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    replayed_unix_ms INTEGER
);
CREATE INDEX dead_letters_by_tenant ON dead_letters (tenant, id);
"#,
    r#"
CREATE TABLE peers (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    public_key TEXT NOT NULL,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    send TEXT NOT NULL,
    accept TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL
);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    peer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_unix_ms INTEGER NOT NULL,
    last_error TEXT,
    created_unix_ms INTEGER NOT NULL,
    delivered_unix_ms INTEGER,
    UNIQUE (peer, event_id)
);
CREATE INDEX outbox_due ON outbox (next_attempt_unix_ms) WHERE status = 'pending';
CREATE TABLE hook_bindings (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    hook TEXT NOT NULL,
    module TEXT NOT NULL,
    function TEXT NOT NULL,
    updated_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, hook)
) WITHOUT ROWID;
"#,
    // Each execution of a run (the first, then one per retry) has its number, so that an
    // execution that outlived a cancel cannot journal into the retry that followed.
    r#"
ALTER TABLE runs ADD COLUMN execution INTEGER NOT NULL DEFAULT 0;
-- The module a binding's reference resolved to when it was bound: what calls run.
ALTER TABLE hook_bindings ADD COLUMN module_id TEXT;
-- The Extism manifest options a tenant stores with a module, for direct calls.
CREATE TABLE module_manifests (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    module_id TEXT NOT NULL,
    manifest TEXT NOT NULL,
    updated_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, module_id)
) WITHOUT ROWID;
"#,
    // v1 routes used to act on tenant `default`; they now have tenant `v1`. A database
    // from before (it has `default` and no `v1`) keeps what its v1 clients saw: `v1`
    // gets a copy of `default`'s modules (the bytes are shared, `default` keeps its
    // own) and the workflows made through v1 routes move to it. Their past runs stay
    // in `default`'s history. A newer or a fresh database is left as it is.
    r#"
CREATE TEMP TABLE v1_split AS SELECT 1 AS due
    WHERE EXISTS (SELECT 1 FROM tenants WHERE name = 'default')
    AND NOT EXISTS (SELECT 1 FROM tenants WHERE name = 'v1');
INSERT INTO tenants (name, created_unix_ms)
    SELECT 'v1', created_unix_ms FROM tenants
    WHERE name = 'default' AND EXISTS (SELECT 1 FROM temp.v1_split);
INSERT INTO modules (tenant, id, info, name, version, created_unix_ms)
    SELECT 'v1', id, json_set(info, '$.tenant', 'v1'), name, version, created_unix_ms
    FROM modules WHERE tenant = 'default' AND EXISTS (SELECT 1 FROM temp.v1_split);
UPDATE workflow_versions SET tenant = 'v1'
    WHERE tenant = 'default' AND EXISTS (SELECT 1 FROM temp.v1_split)
    AND name IN (SELECT workflow FROM v1_workflows WHERE tenant = 'default');
UPDATE workflows SET tenant = 'v1'
    WHERE tenant = 'default' AND EXISTS (SELECT 1 FROM temp.v1_split)
    AND name IN (SELECT workflow FROM v1_workflows WHERE tenant = 'default');
UPDATE v1_workflows SET tenant = 'v1'
    WHERE tenant = 'default' AND EXISTS (SELECT 1 FROM temp.v1_split);
DROP TABLE temp.v1_split;
"#,
    // Tokens tenants hold on their peers' agents, to see those sides of a trace.
    r#"
CREATE TABLE peer_views (
    peer TEXT PRIMARY KEY REFERENCES peers(name) ON DELETE CASCADE,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    token TEXT NOT NULL,
    updated_unix_ms INTEGER NOT NULL
);
"#,
    // Tapes: recorded calls, for replaying new versions of plug-ins on real traffic.
    r#"
CREATE TABLE tapes (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    module_name TEXT NOT NULL,
    module_id TEXT NOT NULL,
    function TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    host_calls TEXT NOT NULL,
    fuel_used INTEGER NOT NULL,
    duration_us INTEGER NOT NULL,
    created_unix_ms INTEGER NOT NULL
);
CREATE INDEX tapes_by_module ON tapes (tenant, module_name, function, id);
"#,
    // Releases: which version of each module name serves it, and rollouts of another.
    // Every existing name starts with its newest registration live, as before.
    r#"
CREATE TABLE module_releases (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    live TEXT NOT NULL,
    live_version TEXT,
    previous TEXT,
    previous_version TEXT,
    rollout TEXT,
    updated_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE module_release_history (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    at_unix_ms INTEGER NOT NULL,
    action TEXT NOT NULL,
    module TEXT NOT NULL,
    version TEXT,
    detail TEXT
);
CREATE INDEX module_release_history_by_name ON module_release_history (tenant, name, id);
INSERT INTO module_releases (tenant, name, live, live_version, updated_unix_ms)
    SELECT tenant, name, id, NULLIF(version, ''), created_unix_ms FROM modules AS m
    WHERE rowid = (SELECT rowid FROM modules AS n WHERE n.tenant = m.tenant AND n.name = m.name
                   ORDER BY created_unix_ms DESC, rowid DESC LIMIT 1);
"#,
    // What a recorded call started with: the instance's vars and the grant's config.
    r#"
ALTER TABLE tapes ADD COLUMN start TEXT;
"#,
    // Runs an agent of a cluster holds under its event's lease: not resumed at start.
    r#"
ALTER TABLE runs ADD COLUMN leased INTEGER NOT NULL DEFAULT 0;
"#,
    // Runs another agent of the cluster ran (its member id): retried or cancelled there.
    r#"
ALTER TABLE runs ADD COLUMN ran_by TEXT;
"#,
];
