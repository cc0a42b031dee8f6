# make serve  - everything needed (virtual environment, dependencies, certificates), then run the service
# make test   - everything needed, then the tests
# make reliability - the reliability tests alone (load, faults, hostile input), printing the figures they measure
# make bench  - the benchmark (BENCH_QUICK=1 for a short run)
# make gen    - regenerate gen/ from jobworker.proto
# make cert   - a CA, a server certificate and one client certificate per role, under certs/ (never overwritten)
# make renew-certs - throw the certificates and keys away and make new ones
# make install-service - (as root) jobworker.service for this checkout, its certificates in /etc/jobworker, and
#                systemd reloaded; then `systemctl enable --now jobworker`. Certificates there are never overwritten
# make test-cgroup2 - on a cgroup v2 kernel, in a virtual machine (CGROUP2_VM): the isolation tests, with pytest's
#                temporary directories on tmpfs and on a disk, then the service's tests with systemd as PID 1

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ROLES := admin user observer
DAYS := 825
CGROUP2_VM ?= ../shared/tools/cgroup2-vm
# What make test-cgroup2 runs of test_jobworker.py: the tests that make, limit, read, kill or remove cgroups, or run
# jobs in namespaces (the whole suite takes about an hour in the emulated VM; these, a few minutes).
CGROUP2_TESTS := (isolation or cgroup or limit or memory or oom or quota or processes or mount or daemon or zombies \
  or unprivileged or outright or forked or init_pool or init_does or disk or tmpfs or users or transient or privilege) \
  and not reliability or fork_bomb

.PHONY: serve test reliability bench gen cert renew-certs install-service test-cgroup2 clean
.DELETE_ON_ERROR:
.PRECIOUS: certs/%.key

serve: $(VENV)/.installed cert
	$(PY) jobworker.py serve $(ARGS)

test: $(VENV)/.installed cert
	$(PY) -m pytest -q $(PYTEST_ARGS) test_jobworker.py

reliability: $(VENV)/.installed cert
	$(PY) -m pytest -q -s --durations=0 -k reliability $(PYTEST_ARGS) test_jobworker.py

test-cgroup2: $(VENV)/.installed cert
	$(CGROUP2_VM) --timeout 1200 -- sh -c '$(PY) -m pytest -q -k "$(CGROUP2_TESTS)" $(PYTEST_ARGS) test_jobworker.py && \
	  $(PY) -m pytest -q -k "$(CGROUP2_TESTS)" --basetemp=/mnt/data/pytest $(PYTEST_ARGS) test_jobworker.py'
	$(CGROUP2_VM) --systemd --ro-cwd --timeout 900 -e JOBWORKER_TEST_SYSTEMD=1 -- \
	  $(PY) -m pytest -q $(PYTEST_ARGS) test_hosts.py

install-service: $(VENV)/.installed cert
	@test "$$(id -u)" = 0 || { echo "make install-service: run it as root (sudo make install-service)" >&2; exit 1; }
	install -d -m 700 /etc/jobworker
	if [ -e /etc/jobworker/server.key ]; then echo "keeping the certificates and key in /etc/jobworker"; \
	else install -m 600 certs/server.pem certs/server.key certs/ca.pem /etc/jobworker/; fi
	sed 's|@HERE@|$(CURDIR)|g' jobworker.service > /etc/systemd/system/jobworker.service
	systemctl daemon-reload
	@echo "installed /etc/systemd/system/jobworker.service: systemctl enable --now jobworker"

bench: $(VENV)/.installed cert
	$(PY) bench_jobworker.py

gen: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Igen=. --python_out=. --grpc_python_out=. jobworker.proto

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

cert: certs/ca.pem certs/server.pem $(ROLES:%=certs/%.pem)

renew-certs:
	rm -rf certs
	$(MAKE) cert

certs/%.key:
	@mkdir -p certs
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $@ 2>/dev/null
	chmod 600 $@

certs/ca.pem: certs/ca.key
	openssl req -x509 -new -sha256 -days 3650 -key $< -subj "/O=jobworker/CN=jobworker CA" \
	  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" -out $@

certs/server.pem: certs/server.key certs/ca.pem
	printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n' > $@.ext
	openssl req -new -key $< -subj "/O=jobworker/CN=localhost" | openssl x509 -req -sha256 -days $(DAYS) \
	  -CA certs/ca.pem -CAkey certs/ca.key -set_serial 0x$$(openssl rand -hex 16) -extfile $@.ext -out $@ 2>/dev/null
	rm -f $@.ext

# One client certificate per role: the role is the subject's OU, the identity the whole subject.
certs/%.pem: certs/%.key certs/ca.pem
	printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > $@.ext
	openssl req -new -key $< -subj "/O=jobworker/OU=$*/CN=$*" | openssl x509 -req -sha256 -days $(DAYS) \
	  -CA certs/ca.pem -CAkey certs/ca.key -set_serial 0x$$(openssl rand -hex 16) -extfile $@.ext -out $@ 2>/dev/null
	rm -f $@.ext

clean:
	rm -rf $(VENV) data .pytest_cache __pycache__
