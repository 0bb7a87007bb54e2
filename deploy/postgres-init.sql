-- One database per SQL service (tokens_auth is created by POSTGRES_DB).
CREATE DATABASE tokens_ledger OWNER tokens;
CREATE DATABASE tokens_router OWNER tokens;
