package awskms

import (
	"strings"
	"testing"
)

const (
	testKeyARN   = "arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
	testMRKARN   = "arn:aws:kms:us-east-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab"
	testAliasARN = "arn:aws:kms:eu-west-2:111122223333:alias/kubekms"
)

func TestParseURI(t *testing.T) {
	tests := []struct {
		uri     string
		want    KeyURI
		wantErr string // substring; "" means success
	}{
		{uri: "awskms:///" + testKeyARN, want: KeyURI{Key: testKeyARN, Region: "eu-west-2"}},
		{uri: "AWSKMS:///" + testKeyARN, want: KeyURI{Key: testKeyARN, Region: "eu-west-2"}},
		{uri: "awskms:///" + testMRKARN, want: KeyURI{Key: testMRKARN, Region: "us-east-1"}},
		{uri: "awskms:///" + testAliasARN, want: KeyURI{Key: testAliasARN, Region: "eu-west-2"}},
		{uri: "awskms:///arn:aws-cn:kms:cn-north-1:111122223333:alias/a", want: KeyURI{Key: "arn:aws-cn:kms:cn-north-1:111122223333:alias/a", Region: "cn-north-1"}},
		{uri: "awskms:///alias/kubekms", want: KeyURI{Key: "alias/kubekms"}},
		{uri: "awskms:///alias/team/kube_kms-1", want: KeyURI{Key: "alias/team/kube_kms-1"}},
		{uri: "awskms:///alias/kubekms?region=us-gov-west-1", want: KeyURI{Key: "alias/kubekms", Region: "us-gov-west-1"}},
		{
			uri:  "awskms:///" + testKeyARN + "?region=eu-west-2&endpoint=https%3A%2F%2Fvpce-1.kms.eu-west-2.vpce.amazonaws.com&key-id-suffix=v2",
			want: KeyURI{Key: testKeyARN, Region: "eu-west-2", Endpoint: "https://vpce-1.kms.eu-west-2.vpce.amazonaws.com", KeyIDSuffix: "v2"},
		},
		{uri: "awskms:///alias/k?endpoint=http://127.0.0.1:4599", want: KeyURI{Key: "alias/k", Endpoint: "http://127.0.0.1:4599"}},

		{uri: "", wantErr: "scheme is not awskms"},
		{uri: "aws-kms://" + testKeyARN, wantErr: "scheme is not awskms"},
		{uri: "awskms://" + testKeyARN, wantErr: "three slashes"},
		{uri: "awskms://host/" + testKeyARN, wantErr: "three slashes"},
		{uri: "awskms:" + testKeyARN, wantErr: "three slashes"},
		{uri: "awskms:///", wantErr: "no key"},
		{uri: "awskms:///?region=eu-west-2", wantErr: "no key"},
		{uri: "awskms:///1234abcd-12ab-34cd-56ef-1234567890ab", wantErr: "bare key ID"},
		{uri: "awskms:///alias/", wantErr: "alias name"},
		{uri: "awskms:///alias/a b", wantErr: "alias name"},
		{uri: "awskms:///alias/a%2Fb", wantErr: "alias name"},
		{uri: "awskms:///alias/" + strings.Repeat("a", 251), wantErr: "alias name"},
		{uri: "awskms:///alias/k#frag", wantErr: "fragment"},
		{uri: "awskms:///arn:aws:s3:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab", wantErr: "want kms"},
		{uri: "awskms:///arn:foo:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab", wantErr: "partition"},
		{uri: "awskms:///arn:aws:kms::111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab", wantErr: "region"},
		{uri: "awskms:///arn:aws:kms:eu-west-2:1111:key/1234abcd-12ab-34cd-56ef-1234567890ab", wantErr: "12 digits"},
		{uri: "awskms:///arn:aws:kms:eu-west-2:111122223333:key/not-a-key", wantErr: "not a KMS key ID"},
		{uri: "awskms:///arn:aws:kms:eu-west-2:111122223333:key/", wantErr: "not a KMS key ID"},
		{uri: "awskms:///arn:aws:kms:eu-west-2:111122223333:grant/x", wantErr: "neither key/KEY-ID nor alias/NAME"},
		{uri: "awskms:///arn:aws:kms:eu-west-2", wantErr: "key ARN"},
		{uri: "awskms:///" + testKeyARN + "?region=us-east-1", wantErr: "differs from the key ARN's region"},
		{uri: "awskms:///alias/k?region=Europe", wantErr: "not a region name"},
		{uri: "awskms:///alias/k?region=", wantErr: "empty"},
		{uri: "awskms:///alias/k?region=eu-west-2&region=eu-west-2", wantErr: "2 times"},
		{uri: "awskms:///alias/k?Region=eu-west-2", wantErr: "unknown option"},
		{uri: "awskms:///alias/k?profile=prod", wantErr: "unknown option"},
		{uri: "awskms:///alias/k?region=%zz", wantErr: "query"},
		{uri: "awskms:///alias/k?endpoint=ftp://127.0.0.1", wantErr: "http or https"},
		{uri: "awskms:///alias/k?endpoint=127.0.0.1:4599", wantErr: "endpoint"},
		{uri: "awskms:///alias/k?endpoint=http://", wantErr: "no host"},
		{uri: "awskms:///alias/k?endpoint=http://user:pw@127.0.0.1", wantErr: "user info"},
		{uri: "awskms:///alias/k?endpoint=http://127.0.0.1/%3Fa", wantErr: "query or fragment"},
		{uri: "awskms:///alias/k?key-id-suffix=a%23b", wantErr: "key ID suffix"},
		{uri: "awskms:///alias/k?key-id-suffix=a+b", wantErr: "key ID suffix"},
		{uri: "awskms:///alias/k?key-id-suffix=" + strings.Repeat("x", 129), wantErr: "key ID suffix"},
	}
	for _, tc := range tests {
		t.Run(tc.uri, func(t *testing.T) {
			got, err := ParseURI(tc.uri)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseURI error = %v, want one containing %q (got %+v)", err, tc.wantErr, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseURI: %v", err)
			}
			if got != tc.want {
				t.Fatalf("ParseURI = %+v, want %+v", got, tc.want)
			}
			again, err := ParseURI(got.String())
			if err != nil || again != got {
				t.Fatalf("ParseURI(%q) = %+v, %v; want %+v", got.String(), again, err, got)
			}
		})
	}
}

func TestKeyIDSuffixRoundTrip(t *testing.T) {
	s := &service{suffix: "v2"}
	id, err := s.keyID(testKeyARN)
	if err != nil {
		t.Fatal(err)
	}
	if id != testKeyARN+"#v2" {
		t.Fatalf("keyID = %q", id)
	}
	// The ARN comes back out whatever the suffix was when it was made.
	for _, keyID := range []string{id, testKeyARN, testKeyARN + "#old:1", testMRKARN + "#x"} {
		arn, err := keyARN(keyID)
		if err != nil {
			t.Fatalf("keyARN(%q): %v", keyID, err)
		}
		if want, _, _ := strings.Cut(keyID, "#"); arn != want {
			t.Fatalf("keyARN(%q) = %q, want %q", keyID, arn, want)
		}
	}
	for _, keyID := range []string{"", "#v2", "alias/kubekms", testAliasARN, "arn:aws:kms:eu-west-2:111122223333:key/x y", "arn:aws:s3:::bucket",
		testKeyARN + "x", "arn:aws:kms:eu-west-2:111122223333:key/not-a-uuid"} {
		if _, err := keyARN(keyID); err == nil {
			t.Fatalf("keyARN(%q) accepted a key ID that is not a key ARN", keyID)
		}
	}
	if _, err := s.keyID(testAliasARN); err == nil {
		t.Fatal("keyID accepted an alias ARN")
	}
	long := &service{suffix: strings.Repeat("x", 1024)}
	if _, err := long.keyID(testKeyARN); err == nil {
		t.Fatal("keyID accepted a key ID over 1024 bytes")
	}
}

// FuzzParseURI checks that ParseURI never panics and that what it accepts
// has a canonical form that parses back to the same value.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{
		"awskms:///" + testKeyARN,
		"awskms:///alias/kubekms?region=eu-west-2&key-id-suffix=v1",
		"awskms:///" + testAliasARN + "?endpoint=http://127.0.0.1:4599",
		"awskms://host/alias/x",
		"awskms:///alias/a?region=%zz&region=b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, uri string) {
		u, err := ParseURI(uri)
		if err != nil {
			if u != (KeyURI{}) {
				t.Fatalf("ParseURI(%q) failed but returned %+v", uri, u)
			}
			return
		}
		if u.Key == "" || strings.ContainsAny(u.Key, "?#% ") {
			t.Fatalf("ParseURI(%q) accepted key %q", uri, u.Key)
		}
		if u.IsARN() && u.Region == "" {
			t.Fatalf("ParseURI(%q): ARN without a region", uri)
		}
		again, err := ParseURI(u.String())
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", u.String(), uri, err)
		}
		if again != u {
			t.Fatalf("canonical form %q of %q parses to %+v, want %+v", u.String(), uri, again, u)
		}
	})
}
