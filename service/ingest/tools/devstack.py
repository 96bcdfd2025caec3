"""`python -m ingest.tools.devstack`: the service on this machine against throwaway PostgreSQL and Redis.

Starts both from the Debian packages, migrates to head, generates secrets for the session (printed once
so you can call the API; this is a local sandbox), and runs `python -m ingest` in the foreground. Ctrl-C
stops everything and removes the data.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from ingest.tools.localservers import LocalPostgres, LocalRedis, LocalServerError, missing_prerequisites

SERVICE_DIR = Path(__file__).resolve().parents[2]


def main() -> int:
    reason = missing_prerequisites()
    if reason:
        print(f"devstack: {reason}", file=sys.stderr)
        return 2
    postgres, redis = LocalPostgres(), LocalRedis()
    try:
        postgres.start()
        redis.start()
        url = postgres.create_database("ingest")
        env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis.url,
               "API_KEY": os.environ.get("API_KEY") or secrets.token_hex(24),
               "JWT_SECRET": os.environ.get("JWT_SECRET") or secrets.token_hex(32)}
        subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=SERVICE_DIR, env=env, check=True)
        print(f"devstack: PostgreSQL on 127.0.0.1:{postgres.port}, Redis on 127.0.0.1:{redis.port}\n"
              f"devstack: export API_KEY={env['API_KEY']} JWT_SECRET={env['JWT_SECRET']}\n"
              f"devstack: serving on http://127.0.0.1:{env.get('PORT', '8000')} (Ctrl-C stops)", file=sys.stderr)
        service = subprocess.Popen([sys.executable, "-m", "ingest"], cwd=SERVICE_DIR, env=env)
        try:
            return service.wait()
        except KeyboardInterrupt:
            service.terminate()
            return service.wait(30)
    except (LocalServerError, subprocess.CalledProcessError) as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    finally:
        redis.stop()
        postgres.stop()


if __name__ == "__main__":
    sys.exit(main())
