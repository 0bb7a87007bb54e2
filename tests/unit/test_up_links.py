"""`./dev up` prints the verification links the mesh mails to its .eml outbox: each once,
none that were there before it started looking."""
from devtool import up
from ledger_svc import billing, emails

BRAND = emails.Branding("billing <billing@tokens.flex.ai>", "http://127.0.0.1:8080", 5_000_000_000)


def verification(row_id: int, to: str, token: str):
    return emails.render({"id": row_id, "kind": billing.EMAIL_VERIFY, "to_addr": to, "created_ms": 1_800_000_000_000,
                          "balance_nanos": 0, "details": f'{{"link": "http://127.0.0.1:8080/dashboard/verify#{token}", '
                                                         f'"hours": "72"}}'}, BRAND)


def test_each_new_link_is_found_once_and_old_ones_never(tmp_path):
    outbox = emails.FileTransport(tmp_path)
    assert outbox.send([verification(1, "old@example.com", "tsv_old")]) == [None]
    links = up.VerificationLinks(tmp_path)
    low = emails.render({"id": 3, "kind": "low", "to_addr": "a@example.com", "created_ms": 1_800_000_000_000,
                         "balance_nanos": 1}, BRAND)
    assert outbox.send([verification(2, "new@example.com", "tsv_new"), low]) == [None, None]
    assert links.new() == [("new@example.com", "http://127.0.0.1:8080/dashboard/verify#tsv_new")]
    assert links.new() == []
