"""`python -m utils.report DIR...`: the report over many runs (utils/reporting/report.py)."""

from utils.reporting.report import main

if __name__ == "__main__":
    main()
