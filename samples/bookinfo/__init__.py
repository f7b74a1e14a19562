"""A re-creation of Istio's Bookinfo: productpage calls details and reviews; reviews v2/v3 call ratings."""
