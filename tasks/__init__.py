"""Pipeline steps: plain functions plus thin Prefect task wrappers. See ARCHITECTURE.md."""
