//! The SQL schema of Nix 2.8's store database, as `sqlite_master` of a database
//! created by Nix 2.8.0 shows it (`schema` file `10`, `ca-schema` file `3`).
//!
//! SQLite keeps each statement's text in `sqlite_master`, so the text (layout and
//! comments included) is reproduced here to give a database identical to Nix's.
//! [`CA_SCHEMA`] is what Nix adds when `ca-derivations` is enabled.

/// `schema` file contents: Nix's schema version.
pub const NIX_SCHEMA_VERSION: u32 = 10;
/// `ca-schema` file contents.
pub const NIX_CA_SCHEMA_VERSION: u32 = 3;

/// The main tables (ValidPaths, Refs, DerivationOutputs), their indices and trigger.
pub const SCHEMA: &str = r#"create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- A self-reference would block deleting its path (on delete restrict): drop it first.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"#;

/// The tables for content-addressed derivations (Realisations, RealisationsRefs).
pub const CA_SCHEMA: &str = r#"create table if not exists Realisations (
    id integer primary key autoincrement not null,
    drvPath text not null,
    outputName text not null, -- symbolic output id, usually "out"
    outputPath integer not null,
    signatures text, -- space-separated list
    foreign key (outputPath) references ValidPaths(id) on delete cascade
);

create index if not exists IndexRealisations on Realisations(drvPath, outputName);

create table if not exists RealisationsRefs (
    referrer integer not null,
    realisationReference integer,
    foreign key (referrer) references Realisations(id) on delete cascade,
    foreign key (realisationReference) references Realisations(id) on delete restrict
);

create index if not exists IndexRealisationsRefs on RealisationsRefs(referrer);
create index if not exists IndexRealisationsRefsOnOutputPath on Realisations(outputPath);
"#;
