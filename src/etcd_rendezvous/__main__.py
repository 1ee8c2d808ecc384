"""``python -m etcd_rendezvous`` runs the CLI."""

from etcd_rendezvous.cli import main

if __name__ == "__main__":
    main()
