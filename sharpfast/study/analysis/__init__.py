"""What a sweep's store says: rank-correlation statistics (stats), the report (report: computed once,
written as markdown, CSV and an interactive page, report_html) and eigenvalue spectral densities (esd)."""
