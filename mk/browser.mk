# Debian's headless Chromium and its WebDriver, for the admin console's browser tests
# (tests/integration/test_admin_console.py drives them through selenium, a dev dependency).
#   make browser-install   chromium and chromium-driver from apt, when chromedriver is not on PATH
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: browser-install

browser-install:
	@command -v chromedriver >/dev/null && command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }
