module ca-daemon/tests/linkerd-check

go 1.24
