"""The study wing: model zoos, sweeps of sharpness definitions over them, the results store,
rank-correlation statistics, reports and the ``sharpfast`` command line. It uses the
measurement core (``sharpfast``) only through its public API."""
