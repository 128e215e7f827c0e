"""A database's catalog as a set of lines, to diff what an install, upgrade or uninstall changed.

Every object a host application can own is listed with what matters about it (owner, grants,
definition): schemas, relations and their columns, constraints, indexes, functions (with a hash
of their body), triggers, policies, publication membership, default privileges, extensions and
pg_cron jobs. The Supabase CLI's own bookkeeping (`supabase_migrations`) is left out: a push
changes it by design.
"""

from __future__ import annotations

from scripts.pgcluster import Database

_SCHEMAS = (
    "n.nspname not in ('pg_catalog', 'information_schema', 'supabase_migrations') "
    "and n.nspname not like 'pg_toast%' and n.nspname not like 'pg_temp%'"
)

_SNAPSHOT = f"""
select 'schema ' || n.nspname || ' owner=' || n.nspowner::regrole
  || ' acl=' || coalesce(n.nspacl::text, '-')
from pg_namespace as n where {_SCHEMAS}
union all
select 'relation ' || n.nspname || '.' || c.relname || ' kind=' || c.relkind::text
  || ' owner=' || c.relowner::regrole || ' acl=' || coalesce(c.relacl::text, '-')
  || ' rls=' || c.relrowsecurity || ' options=' || coalesce(c.reloptions::text, '-')
from pg_class as c join pg_namespace as n on n.oid = c.relnamespace
where {_SCHEMAS} and c.relkind <> 't'
union all
select 'column ' || n.nspname || '.' || c.relname || '.' || a.attname || ' '
  || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull
  || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-')
  || ' acl=' || coalesce(a.attacl::text, '-')
from pg_attribute as a
join pg_class as c on c.oid = a.attrelid
join pg_namespace as n on n.oid = c.relnamespace
left join pg_attrdef as d on d.adrelid = a.attrelid and d.adnum = a.attnum
where {_SCHEMAS} and c.relkind in ('r', 'p', 'v', 'm', 'f') and a.attnum > 0 and not a.attisdropped
union all
select 'constraint ' || n.nspname || '.' || c.relname || ' ' || k.conname || ' '
  || pg_get_constraintdef(k.oid)
from pg_constraint as k
join pg_class as c on c.oid = k.conrelid
join pg_namespace as n on n.oid = c.relnamespace
where {_SCHEMAS}
union all
select 'index ' || pg_get_indexdef(i.indexrelid)
from pg_index as i
join pg_class as c on c.oid = i.indrelid
join pg_namespace as n on n.oid = c.relnamespace
where {_SCHEMAS}
union all
select 'function ' || n.nspname || '.' || p.proname
  || '(' || pg_get_function_identity_arguments(p.oid) || ')'
  || ' returns ' || pg_get_function_result(p.oid) || ' owner=' || p.proowner::regrole
  || ' definer=' || p.prosecdef || ' config=' || coalesce(p.proconfig::text, '-')
  || ' acl=' || coalesce(p.proacl::text, '-') || ' body=' || md5(coalesce(p.prosrc, ''))
from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace
where {_SCHEMAS}
union all
select 'trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
from pg_trigger as t
join pg_class as c on c.oid = t.tgrelid
join pg_namespace as n on n.oid = c.relnamespace
where {_SCHEMAS} and not t.tgisinternal
union all
select 'policy ' || schemaname || '.' || tablename || ' ' || policyname || ' ' || cmd
  || ' roles=' || roles::text || ' using=' || coalesce(qual, '-')
  || ' check=' || coalesce(with_check, '-')
from pg_policies
union all
select 'publication ' || p.pubname || ' owner=' || p.pubowner::regrole
from pg_publication as p
union all
select 'publication table ' || pubname || ' ' || schemaname || '.' || tablename
from pg_publication_tables
union all
select 'default acl ' || d.defaclrole::regrole || ' ' || coalesce(n.nspname, '*') || ' '
  || d.defaclobjtype::text || ' ' || d.defaclacl::text
from pg_default_acl as d left join pg_namespace as n on n.oid = d.defaclnamespace
union all
select 'extension ' || extname || ' ' || extversion from pg_extension
"""

_CRON = (
    "select 'cron job ' || jobname || ' ' || schedule || ' ' || command || ' ' || username "
    "from cron.job"
)


def snapshot(db: Database) -> set[str]:
    """The catalog lines of `db` (see the module's docstring)."""
    lines = set(db.psql(_SNAPSHOT).splitlines())
    if db.psql("select to_regclass('cron.job') is not null").strip() == "t":
        lines |= set(db.psql(_CRON).splitlines())
    return {line for line in lines if line}


def diff(before: set[str], after: set[str]) -> str:
    """A readable difference of two snapshots ('' when equal)."""
    gone = sorted(before - after)
    new = sorted(after - before)
    if not gone and not new:
        return ""
    return "\n".join([*(f"- {line}" for line in gone), *(f"+ {line}" for line in new)])
