"""Scrapy, tuned for raw fetching, over the same URL file: the asyncio reactor (on uvloop),
high concurrency, no robots.txt, cookies, retries, throttling or telnet; bodies downloaded and
dropped (no item pipeline).

    python scrapy_spider.py URLS.csv --concurrency 200

Prints one JSON line: {"requests", "ok", "elapsed_s"}. Only for local benchmark servers.
"""

import argparse
import json
import time

import scrapy
from scrapy.crawler import CrawlerProcess


class UrlFileSpider(scrapy.Spider):
    name = "urlfile"

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.ok = 0

    async def start(self):
        with open(self.path) as fh:
            for line in fh:
                url = line.strip()
                if url and url != "url":
                    yield scrapy.Request(url, callback=self.parse, dont_filter=True)

    def parse(self, response):
        self.ok += response.status == 200
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls")
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    settings = {
        "CONCURRENT_REQUESTS": args.concurrency,
        "CONCURRENT_REQUESTS_PER_DOMAIN": args.concurrency,
        "ROBOTSTXT_OBEY": False,
        "COOKIES_ENABLED": False,
        "RETRY_ENABLED": False,
        "REDIRECT_ENABLED": True,
        "LOG_LEVEL": "WARNING",
        "TELNETCONSOLE_ENABLED": False,
        "AUTOTHROTTLE_ENABLED": False,
        "DOWNLOAD_DELAY": 0,
        "DOWNLOAD_TIMEOUT": 60,
        "DNSCACHE_ENABLED": True,
        "HTTPCACHE_ENABLED": False,
        "MEMUSAGE_ENABLED": False,
        "TWISTED_REACTOR": "twisted.internet.asyncioreactor.AsyncioSelectorReactor",
        "ASYNCIO_EVENT_LOOP": "uvloop.Loop",
    }
    started = time.perf_counter()
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(UrlFileSpider)
    process.crawl(crawler, path=args.urls)
    process.start()
    stats = crawler.stats.get_stats()
    print(
        json.dumps(
            {
                "requests": stats.get("downloader/request_count", 0),
                "ok": crawler.spider.ok,
                "elapsed_s": round(time.perf_counter() - started, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
